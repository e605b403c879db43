"""How an error reads on a command line: every CLI and every library error message that quotes another
exception uses `one_line`, so a user sees one readable line and never a traceback or a blank reason."""
from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception as one readable line (its first line; its type when it has no text), for CLI errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
