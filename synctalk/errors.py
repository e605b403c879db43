"""How an error reads on a command line: CLIs and library errors that quote another exception pass it
through `one_line`, so the user gets one readable line, never a traceback or a blank reason."""
from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception as one readable line (its first line; its type when it has no text), for CLI errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
