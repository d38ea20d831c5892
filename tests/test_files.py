"""`sheared.files.publish_dir`: a folder (or file) built beside its destination, then swapped in."""

from __future__ import annotations

import errno
import os
import re

import pytest

from sheared import files
from sheared.files import atomic_write_json, failed_path, publish_dir


class Broken(RuntimeError):
    pass


class Unverified(RuntimeError):
    pass


def _old(dest):
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    (dest / "only-old.txt").write_text("old")


def _siblings(dest):
    return sorted(p.name for p in dest.parent.iterdir())


def test_success_publishes_the_folder(tmp_path):
    dest = tmp_path / "sub" / "out"
    with publish_dir(dest) as tmp:
        assert tmp == tmp_path / "sub" / "out.tmp" and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("new")
        assert not dest.exists()
    assert (dest / "a.txt").read_text() == "new"
    assert _siblings(dest) == ["out"]


def test_replace_swaps_a_previous_folder_and_removes_it_after(tmp_path):
    dest = tmp_path / "out"
    _old(dest)
    with publish_dir(dest, replace=True, fsync=True) as tmp:
        (tmp / "a.txt").write_text("new")
        assert (dest / "a.txt").read_text() == "old"  # the previous one stays until the new one is in place
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert (dest / "a.txt").read_text() == "new"
    assert _siblings(dest) == ["out"]  # no aside folder left


def test_without_replace_an_existing_folder_is_kept(tmp_path):
    dest = tmp_path / "out"
    _old(dest)
    with pytest.raises(FileExistsError), publish_dir(dest) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "old"
    assert _siblings(dest) == ["out"]


def test_without_replace_an_empty_folder_is_replaced(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with publish_dir(dest) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "new"


@pytest.mark.parametrize("replace", [False, True])
def test_an_exception_leaves_the_destination_and_no_temporary_folder(tmp_path, replace):
    dest = tmp_path / "out"
    _old(dest)
    with pytest.raises(Broken), publish_dir(dest, replace=replace) as tmp:
        (tmp / "a.txt").write_text("new")
        raise Broken
    assert (dest / "a.txt").read_text() == "old" and (dest / "only-old.txt").is_file()
    assert _siblings(dest) == ["out"]


def test_an_exception_without_a_destination_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), publish_dir(dest):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temporary_folder_is_removed_first(tmp_path):
    dest = tmp_path / "out"
    stale = tmp_path / "out.export-tmp"
    stale.mkdir()
    (stale / "half.bin").write_text("killed")
    with publish_dir(dest, suffix=".export-tmp") as tmp:
        assert tmp == stale and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert _siblings(dest) == ["out"]


def test_a_failed_verification_is_kept_for_inspection(tmp_path):
    dest = tmp_path / "out"
    _old(dest)
    failed = failed_path(dest)
    assert failed == tmp_path / "out.unverified"
    failed.mkdir()
    (failed / "earlier.txt").write_text("earlier failure")
    with pytest.raises(Unverified), publish_dir(dest, replace=True, keep_failed=(Unverified,)) as tmp:
        (tmp / "a.txt").write_text("wrong")
        raise Unverified
    assert (dest / "a.txt").read_text() == "old"
    assert sorted(p.name for p in failed.iterdir()) == ["a.txt"]  # the earlier failure is replaced
    assert _siblings(dest) == ["out", "out.unverified"]
    with pytest.raises(Broken), publish_dir(dest, replace=True, keep_failed=(Unverified,)) as tmp:
        raise Broken  # any other error removes the folder
    assert _siblings(dest) == ["out", "out.unverified"]


def test_a_file_is_published_and_replaced(tmp_path):
    dest = tmp_path / "model.gguf"
    with publish_dir(dest, mkdir=False, fsync=True) as tmp:
        assert tmp == tmp_path / "model.gguf.tmp" and not tmp.exists()
        tmp.write_bytes(b"one")
    with pytest.raises(FileExistsError), publish_dir(dest, mkdir=False) as tmp:
        tmp.write_bytes(b"two")
    assert dest.read_bytes() == b"one" and _siblings(dest) == ["model.gguf"]
    with publish_dir(dest, replace=True, mkdir=False) as tmp:
        tmp.write_bytes(b"two")
    assert dest.read_bytes() == b"two" and _siblings(dest) == ["model.gguf"]
    with (
        pytest.raises(Unverified),
        publish_dir(dest, replace=True, mkdir=False, keep_failed=(Unverified,)) as tmp,
    ):
        tmp.write_bytes(b"wrong")
        raise Unverified
    assert dest.read_bytes() == b"two" and failed_path(dest).read_bytes() == b"wrong"


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    import os

    dest = tmp_path / "out"
    _old(dest)
    real = os.replace

    def fail_second(src, dst):
        if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files, "exchange", lambda a, b: False)  # a file system that cannot exchange
    monkeypatch.setattr(files.os, "replace", fail_second)
    no_space = pytest.raises(files.DiskError, match=f"cannot write {dest}: No space")
    with no_space, publish_dir(dest, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "old"
    assert _siblings(dest) == ["out"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not files.exchange(a, b):
        pytest.skip("this file system cannot exchange two paths (the two-rename fallback is tested above)")
    assert [p.name for p in a.iterdir()] == ["y"] and (b / "x").read_text() == "from a"


def test_a_swap_killed_between_its_two_renames_is_undone_by_the_next_publish(tmp_path):
    """Without an atomic exchange a kill can fall between `dest -> aside` and `tmp -> dest`: the next
    publish_dir puts the previous folder back before anything else."""
    dest = tmp_path / "out"
    _old(dest)
    aside = tmp_path / "out.old.tmp"
    dest.rename(aside)  # the state such a kill leaves: no `out`, the previous one aside, a new one built
    (tmp_path / "out.tmp").mkdir()
    with pytest.raises(Broken), publish_dir(dest, replace=True) as tmp:
        assert (dest / "a.txt").read_text() == "old" and not aside.exists()
        assert not any(tmp.iterdir())  # the stale build was removed
        raise Broken
    assert (dest / "only-old.txt").read_text() == "old"
    assert _siblings(dest) == ["out"]


def test_other_ranks_only_get_the_path(tmp_path):
    dest = tmp_path / "out"
    with publish_dir(dest, owner=False) as tmp:
        assert tmp == tmp_path / "out.tmp" and not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_json_leaves_no_temporary_file(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "x.json", {"é": 1}, indent=1)
    assert path.read_text(encoding="utf-8") == '{\n "é": 1\n}\n'
    assert not files.tmp_path(path).exists()


def test_disk_failures_are_recognised_whatever_raised_them():
    import traceback

    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    torch_zip = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    raised = {
        errno.ENOSPC: [
            OSError(errno.ENOSPC, "No space left on device", "x.bin"),
            torch_zip,
            CheckpointException("ranks:dict_keys([0])", {0: (torch_zip, traceback.StackSummary())}),
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            Exception("No space left on device (os error 28)"),  # tokenizers' save
            OSError("2359296 requested and 464528 written"),  # numpy's tofile (the GGUF writer)
        ],
        errno.EDQUOT: [
            OSError(errno.EDQUOT, "Disk quota exceeded"),
            Exception("Disk quota exceeded (os error 122)"),
        ],
        errno.EROFS: [OSError(errno.EROFS, "Read-only file system"), Exception("I/O error: os error 30")],
        errno.EACCES: [PermissionError(errno.EACCES, "Permission denied")],
    }
    for code, errors in raised.items():
        for error in errors:
            assert files.disk_errno(error) == code, error
            wrapped = RuntimeError("saving failed")
            wrapped.__cause__ = error
            assert files.disk_errno(wrapped) == code  # found along the chain
            assert files.disk_problem(wrapped) == os.strerror(code)
    for other in (
        ValueError("bad value"),
        RuntimeError("unexpected position"),
        OSError(errno.ENOENT, "gone"),
    ):
        assert files.disk_errno(other) is None and files.disk_problem(other) is None


def test_guard_writes_names_the_path_and_passes_other_errors(tmp_path):
    with pytest.raises(files.DiskError) as e, files.guard_writes(tmp_path / "out", needed=3 * 2**20):
        raise Exception("No space left on device (os error 28)")
    assert re.fullmatch(
        rf"cannot write {re.escape(str(tmp_path / 'out'))}: No space left on device \([\d,.]+ [KM]iB free, about "
        r"3\.0 MiB needed\); nothing was replaced; free some space and run it again",
        str(e.value),
    )
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, files.UserError)
    with pytest.raises(KeyError), files.guard_writes(tmp_path / "out"):
        raise KeyError("not a disk problem")


def test_a_disk_error_survives_pickling(tmp_path):
    import pickle

    error = files.DiskError(tmp_path / "x", errno.EROFS)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.errno, type(copy)) == (
        str(error),
        tmp_path / "x",
        errno.EROFS,
        files.DiskError,
    )
