"""Atomic files: the one helper every room uses to write something that must be whole or absent.

A file is written as `NAME.tmp` beside its final path, flushed and fsynced, then renamed over the
final path, and the rename is made durable by fsyncing the folder. A crash at any moment leaves
either the old file or the new one, never half of one; the `.tmp` file is removed on failure.

A folder (a checkpoint, an export, a saved tokenizer, a random source) is built the same way by
`publish_dir`: under a temporary name beside its destination, checked there, then renamed into
place. A previous folder is swapped with the new one in one atomic step where the file system can
(Linux `renameat2(RENAME_EXCHANGE)`), else renamed aside until the new one is in place and put
back by the next `publish_dir` if a kill came between the two renames.

Both are the one guarded path of every write: a failure for lack of space or permission, whatever
library raised it (Python's OSError, torch's zip writer, the Rust of tokenizers and safetensors,
numpy), becomes one `DiskError` line naming the path and the space needed (or that the folder is
read-only), after the temporary file or folder is removed and the previous artefact left as it was.
Writes that cannot be atomic (a token file streamed in pieces) run under `guard_writes`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from sheared.errors import UserError

TMP_SUFFIX = ".tmp"
# What a folder (or file) that failed its verification is kept as beside its destination, for inspection.
FAILED_SUFFIX = ".unverified"


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


def atomic_write(
    path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False, needed: int | None = None
) -> Path:
    """Write `path` atomically: `write(handle)` fills `path.tmp`, which is fsynced and renamed.

    Args:
        path: the final file; its folder is created if missing.
        write: called once with the open temporary file.
        binary: open in binary mode (text mode writes UTF-8 with `\\n` line ends).
        needed: about how many bytes the file takes (for the message of a full disk), if known.

    Returns:
        `path`.

    Raises:
        DiskError: no space, or a read-only folder; `path` is left as it was and no `.tmp` stays.
    """
    p = Path(path)
    tmp = tmp_path(p)
    with guard_writes(p, needed=needed):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, p)
        finally:
            _unlink_quietly(tmp)
    fsync_dir(p.parent)
    return p


def _unlink_quietly(path: Path) -> None:
    """Remove a temporary file if there is one (on a read-only folder there never is)."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a string."""
    return atomic_write(path, lambda f: f.write(text), needed=len(text.encode("utf-8")))


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """`atomic_write` of lines that already end in `\\n`."""
    needed = sum(len(x.encode("utf-8")) for x in lines) if isinstance(lines, list | tuple) else None
    return atomic_write(path, lambda f: f.writelines(lines), needed=needed)


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """`atomic_write` of JSON (UTF-8, not ASCII-escaped, a final newline)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def failed_path(dest: str | Path) -> Path:
    """Where `publish_dir` keeps a build of `dest` that failed with one of its `keep_failed` errors."""
    p = Path(dest)
    return p.with_name(p.name + FAILED_SUFFIX)


def _remove(path: Path) -> None:
    """Remove a folder (recursively) or a file, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextmanager
def publish_dir(
    dest: str | Path,
    *,
    replace: bool = False,
    suffix: str = TMP_SUFFIX,
    mkdir: bool = True,
    fsync: bool = False,
    keep_failed: tuple[type[BaseException], ...] = (),
    owner: bool = True,
    needed: int | None = None,
) -> Iterator[Path]:
    """Build `dest` under a temporary name beside it; when the body succeeds, rename it into place.

    `with publish_dir(dest) as tmp:` yields `tmp` = `dest` + `suffix` in the same folder (a stale one
    left by a killed process is removed first; the parent folder is created). The body writes and
    checks everything in `tmp`. When it returns, `tmp` is renamed to `dest` and the rename is made
    durable (the parent folder is fsynced), so `dest` is at any moment absent, the previous one or
    the new one, never half of one. When the body raises, `tmp` is removed (or kept, see
    `keep_failed`), `dest` is left as it was, and the exception propagates.

    Args:
        dest: the final folder (or, with `mkdir=False`, a single file the body writes at `tmp`).
        replace: replace an existing `dest`. A folder is exchanged with `tmp` in one atomic step
            (`exchange`) and then removed; where the file system cannot exchange, it is first
            renamed aside to `dest.old` + `suffix` and removed only once the new one is in place
            (put back if that rename fails, or by the next `publish_dir` after a kill between the
            two renames); a file is replaced by the one rename. Without `replace`, an existing `dest` (other than an empty
            folder, which a rename replaces) makes the swap fail with FileExistsError.
        suffix: the temporary name's suffix (`.tmp`; an export uses `.export-tmp`). Code that
            cleans up after a killed process recognises leftovers by it: the aside folder ends in
            it too.
        mkdir: create `tmp` as an empty folder; False lets the body create it (e.g. write a file).
        fsync: fsync every file under `tmp` (or the file `tmp`) before the rename.
        keep_failed: exception types after which `tmp` is kept as `failed_path(dest)` (`dest` +
            `.unverified`, replacing an earlier one) for inspection instead of being removed.
        owner: whether this process creates, renames and cleans up `tmp`. The other ranks of a
            distributed job pass False: they only get the path and write into it, between barriers
            the caller places.
        needed: about how many bytes `dest` takes (for the message of a full disk), if known.

    Raises:
        DiskError: the body (whatever library it calls) or the swap failed for lack of space or
            permission; `tmp` is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + suffix)
    aside = dest.with_name(dest.name + ".old" + suffix)
    if not owner:
        yield tmp
        return
    with guard_writes(dest, needed=needed):
        if aside.exists() and not (dest.exists() or dest.is_symlink()):
            os.replace(aside, dest)  # a swap killed between its two renames: the previous one comes back
        try:
            _remove(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if mkdir:
                tmp.mkdir()
            yield tmp
            if fsync:
                fsync_tree(tmp) if tmp.is_dir() else _fsync_file(tmp)
            _swap_in(tmp, dest, replace=replace, aside=aside)
        except BaseException as e:
            if isinstance(e, keep_failed) and (tmp.exists() or tmp.is_symlink()):
                failed = failed_path(dest)
                _remove(failed)
                os.replace(tmp, failed)
            else:
                _remove(tmp)
            raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


RENAME_EXCHANGE = 2  # renameat2 flag: swap two existing paths atomically (linux/fs.h, Linux >= 3.15)
AT_FDCWD = -100  # renameat2: paths relative to the working directory (linux/fcntl.h)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the platform or file system cannot
    (then nothing was changed)."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.5)
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(tmp: Path, dest: Path, *, replace: bool, aside: Path) -> None:
    """Rename `tmp` to `dest`. An existing folder `dest` (when `replace`) is exchanged with `tmp` in
    one step, or where that cannot be done, stays as `aside` until `tmp` is renamed."""
    exists = dest.exists() or dest.is_symlink()
    if exists and not replace and not (tmp.is_dir() and _is_empty_dir(dest)):
        raise FileExistsError(errno.EEXIST, f"{dest} exists and is not replaced", str(dest))
    if exists and replace and (dest.is_dir() or tmp.is_dir()):
        if exchange(tmp, dest):  # `dest` is at every moment the previous folder or the new one
            fsync_dir(dest.parent)
            _remove(tmp)  # the previous one; a leftover of a kill here is removed by the next publish_dir
            return
        _remove(aside)
        os.replace(dest, aside)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(aside, dest)
            raise
        fsync_dir(dest.parent)
        _remove(aside)
        return
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


# errno values of a write that cannot succeed until the user frees space or fixes permissions
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PERMISSION_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
DISK_ERRNOS = SPACE_ERRNOS + PERMISSION_ERRNOS
# What libraries that lose the errno say instead: Rust's io::Error (tokenizers, safetensors) ends in
# "(os error N)"; torch's zip writer (inline_container.cc) and numpy's tofile report only a short write,
# which on a local disk means it is full.
DISK_MESSAGES: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"No space left on device|os error 28\b"), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122\b"), errno.EDQUOT),
    (re.compile(r"Read-only file system|os error 30\b"), errno.EROFS),
    (re.compile(r"Permission denied|os error 13\b"), errno.EACCES),
    (re.compile(r"unexpected pos \d+ vs \d+|\d+ requested and \d+ written"), errno.ENOSPC),
)


def _linked(e: BaseException) -> list[BaseException]:
    """The exceptions `e` carries: its cause and context, exceptions among its arguments, and the
    per-rank failures of torch.distributed.checkpoint's CheckpointException ((exception, stack) pairs)."""
    linked: list[Any] = [e.__cause__, e.__context__, *getattr(e, "args", ())]
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        linked += failures.values()
    out = []
    for item in linked:
        if isinstance(item, tuple) and item and isinstance(item[0], BaseException):
            item = item[0]
        if isinstance(item, BaseException):
            out.append(item)
    return out


def disk_errno(error: BaseException) -> int | None:
    """The errno (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) when `error` or anything it carries (causes,
    context, per-rank failures) is a write failing for lack of space or permission; else None.

    Recognised by the OSError's errno, else by the message, so that a library that raises its own type
    (RuntimeError, SafetensorError, a plain Exception) is recognised too."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskError):
            return e.errno
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.errno
        for pattern, code in DISK_MESSAGES:
            if isinstance(e, Exception) and pattern.search(str(e)):
                return code
        pending += _linked(e)
    return None


def disk_problem(error: BaseException) -> str | None:
    """`No space left on device` (or the like) when `disk_errno` recognises `error`; else None."""
    code = disk_errno(error)
    return None if code is None else os.strerror(code)


def _size(num_bytes: int) -> str:
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:,.1f} MiB"
    return f"{num_bytes / 2**10:,.1f} KiB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


class DiskError(UserError):
    """A write that cannot succeed until the user frees space or makes the folder writable: one line
    naming what was written, the space it needs (or that the folder is read-only), and that nothing
    was replaced."""

    def __init__(
        self,
        path: str | Path,
        code: int,
        needed: int | None = None,
        *,
        what: str | None = None,
        up_to: bool = False,
        advice: str | None = None,
    ):
        """`path`: the file or folder written (its file system's free space is reported); `what`: words
        naming it instead of the bare path; `needed`: bytes it takes (`up_to`: at most that many);
        `advice`: what to do instead of the general advice."""
        self.path, self.errno, self.needed = Path(path), code, needed
        target = what or str(path)
        if code in SPACE_ERRNOS:
            free = free_bytes(path)
            sizes = [] if free is None else [f"{_size(free)} free"]
            if needed is not None:
                sizes.append(f"{'up to' if up_to else 'about'} {_size(needed)} needed")
            detail = os.strerror(code) + (f" ({', '.join(sizes)})" if sizes else "")
            advice = advice or "free some space and run it again"
        else:
            detail = os.strerror(code)
            advice = advice or (
                "choose a writable folder" if code == errno.EROFS else "choose a folder you can write to"
            )
        super().__init__(f"cannot write {target}: {detail}; nothing was replaced; {advice}")

    def __reduce__(self):  # pickled whole (to another rank or process), not rebuilt from the message alone
        return _disk_error_from, (str(self), self.path, self.errno, self.needed)


def _disk_error_from(message: str, path: Path, code: int, needed: int | None) -> DiskError:
    error = DiskError.__new__(DiskError)
    UserError.__init__(error, message)
    error.path, error.errno, error.needed = path, code, needed
    return error


def as_disk_error(
    error: BaseException, path: str | Path, needed: int | Callable[[], int] | None = None, **words: Any
) -> DiskError | None:
    """`error` as a DiskError about `path` when it is a failure for lack of space or permission (an
    inner DiskError is kept: it names the file more precisely); else None. `needed` may be a function,
    called only then; `words`: `what`, `up_to`."""
    if isinstance(error, DiskError):
        return error
    code = disk_errno(error)
    if code is None:
        return None
    return DiskError(path, code, needed() if callable(needed) else needed, **words)


@contextmanager
def guard_writes(
    path: str | Path,
    *,
    needed: int | Callable[[], int] | None = None,
    what: str | None = None,
    up_to: bool = False,
) -> Iterator[None]:
    """Turn a failure for lack of space or permission inside the block into one `DiskError` about
    `path` (see `DiskError` for the other arguments; `needed` may be a function, called only on a full
    disk); other errors pass unchanged. Cleaning up after the failure stays with the block."""
    try:
        yield
    except BaseException as e:
        error = as_disk_error(e, path, needed, what=what, up_to=up_to)
        if error is None or error is e:
            raise
        raise error from None
