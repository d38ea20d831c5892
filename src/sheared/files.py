"""Atomic files: the one helper every room uses to write something that must be whole or absent.

A file is written as `NAME.tmp` beside its final path, flushed and fsynced, then renamed over the
final path, and the rename is made durable by fsyncing the folder. A crash at any moment leaves
either the old file or the new one, never half of one; the `.tmp` file is removed on failure.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | Path) -> Path:
    """The temporary name a file (or folder) is written under before it is renamed into place."""
    p = Path(path)
    return p.with_name(p.name + TMP_SUFFIX)


def fsync_dir(directory: str | Path) -> None:
    """Make renames inside `directory` durable (where the platform allows opening folders)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then `root` itself (before renaming a finished folder)."""
    for file in sorted(Path(root).rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Write `path` atomically: `write(handle)` fills `path.tmp`, which is fsynced and renamed.

    Args:
        path: the final file; its folder is created if missing.
        write: called once with the open temporary file.
        binary: open in binary mode (text mode writes UTF-8 with `\\n` line ends).

    Returns:
        `path`.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a string."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """`atomic_write` of lines that already end in `\\n`."""
    return atomic_write(path, lambda f: f.writelines(lines))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """`atomic_write` of JSON (UTF-8, not ASCII-escaped, a final newline)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


# errno values of a write that cannot succeed until the user frees space or fixes permissions
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_problem(error: BaseException) -> str | None:
    """`No space left on device` (or the like) when `error`, one of its causes, or a per-rank failure
    of a distributed checkpoint is an OSError for lack of space or permission; else None."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return os.strerror(e.errno) + (f": {e.filename}" if e.filename else "")
        pending += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            pending += [f for f in failures.values() if isinstance(f, BaseException)]
        pending += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return None
