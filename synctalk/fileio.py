"""Atomic file writes: the one way the project writes an output that another step may read.

Every writer writes into a temporary file beside the target (same folder, so the final rename is
atomic on POSIX), then `os.replace`s it; a crash or an exception leaves the old file (or none) and
no half-written one. Temporary names start with `.` and contain `.tmp`, so a later run can clean
stale ones left by a killed process (`remove_stale_temporaries`)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp"


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A per-process temporary name beside `path`, keeping its suffix (some writers infer the format)."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 60.0) -> list[Path]:
    """Delete temporaries (`.<name>.tmp<pid>...`) under `folder` left by killed processes: those whose
    writing process is gone (another live process's temporaries are kept), and those without a pid
    older than `older_than_s`. Returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.rglob(f".*{TMP_MARK}*"):
        if not p.is_file():
            continue
        pid = _pid_of(p.name)
        orphan = pid != os.getpid() and not _process_alive(pid) if pid is not None else \
            now - p.stat().st_mtime > older_than_s
        if orphan:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_of(name: str) -> int | None:
    tail = name.split(TMP_MARK, 1)[-1]
    digits = "".join(ch for ch in tail[:12] if ch.isdigit()) if tail[:1].isdigit() else ""
    return int(digits) if digits else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
