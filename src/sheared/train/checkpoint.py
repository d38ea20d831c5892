"""Checkpoints: atomic, sharded-capable (torch distributed checkpoint), resumable exactly.

Layout of `RUN_DIR/checkpoints/step_000100/`:

    *.distcp, .metadata     model, masks (log_alpha), Lagrange multipliers and optimizer state,
                            written by torch.distributed.checkpoint (one shard per rank under FSDP)
    trainer_state.json      step, tokens, sampler state (weights, positions), DBL history,
                            reference losses, world size
    manifest.json           every other file's size and CRC-32, written last

A checkpoint is written into `step_000100.tmp/`, every file is fsynced, the manifest is written
last, and the folder is renamed when complete. A checkpoint counts as complete when it has its
manifest; `--resume` verifies the newest against it and, when that one is damaged (a file
truncated, missing, changed or unlisted, or the manifest itself lost), says so, moves it aside as
`step_N.damaged` and falls back to the newest intact one; with none intact it refuses
(`sheared.train.setup.open_run_dir`). The newest `keep` checkpoints stay.

The names, the listing, the manifest and the read-only loading for export live with the run
directory (`sheared.run_dir`); this module writes checkpoints and resumes from them, across ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sheared.errors import UserError
from sheared.files import SPACE_ERRNOS, TMP_SUFFIX, DiskError, atomic_write_json, disk_errno, publish_dir
from sheared.run_dir import (  # names, listing and the manifest live with the run directory
    DAMAGED_SUFFIX,
    MANIFEST,
    STEP_PATTERN,
    TRAINER_STATE,
    RunDir,
    Trainable,
    checkpoint_name,
    checkpoint_problem,
    list_checkpoints,
    load_module_weights,
    write_manifest,
)

__all__ = [
    "DAMAGED_SUFFIX",
    "MANIFEST",
    "STEP_PATTERN",
    "TRAINER_STATE",
    "Trainable",
    "checkpoint_name",
    "checkpoint_problem",
    "list_checkpoints",
    "load_checkpoint",
    "load_module_weights",
    "newest_intact_checkpoint",
    "remove_leftovers",
    "save_checkpoint",
    "set_aside",
    "write_manifest",
]


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def newest_intact_checkpoint(
    run_dir: str | Path, problems: list[tuple[Path, str]] | None = None
) -> Path | None:
    """The newest checkpoint that matches its manifest (`RunDir.intact_checkpoint`).

    When there is one, the newer damaged ones (a `step_N` folder without its manifest included) are
    set aside (`set_aside`). When there is none, nothing is moved, and what is wrong with each
    checkpoint is appended to `problems`.
    """
    found: list[tuple[Path, str]] = []
    path = RunDir(run_dir).intact_checkpoint(found)
    if path is None:
        if problems is not None:
            problems.extend(found)
        return None
    set_aside(found, path)
    return path


def set_aside(damaged: list[tuple[Path, str]], resumed: Path) -> None:
    """Move damaged checkpoints aside (`step_N.damaged`, never over an earlier one) so that they are
    never mistaken for complete ones, one line on stderr each; every rank calls this."""
    for path, problem in damaged:
        if _is_main():
            aside = _free_name(path.with_name(path.name + DAMAGED_SUFFIX))
            os.replace(path, aside)
            print(
                f"sheared: checkpoint {path.name} is damaged ({problem}); moved to {aside.name}, "
                f"resuming from {resumed.name}",
                file=sys.stderr,
            )
        _barrier()


def _free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when it is taken (an earlier damaged copy is never replaced)."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}-{n}")
    return free


def remove_leftovers(run_dir: str | Path, keep: int) -> None:
    """Remove unfinished `.tmp` checkpoint folders and all but the newest `keep` complete ones."""
    root = RunDir(run_dir).checkpoints
    if not _is_main() or not root.is_dir():
        return
    for tmp in root.glob("*" + TMP_SUFFIX):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About how many bytes a checkpoint of these takes (parameters and optimizer state)."""
    tensors = list(module.state_dict().values())
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Save everything needed to resume at `step`; every rank calls this (collective under FSDP)."""
    root = RunDir(run_dir).checkpoints
    final = root / checkpoint_name(step)
    # written into `step_N.tmp/` by every rank, fsynced and renamed by the main one; a re-run of the
    # same step after a resume replaces it whole; a full or read-only disk leaves nothing half-written
    try:
        with publish_dir(final, replace=True, suffix=TMP_SUFFIX, fsync=True, owner=_is_main()) as tmp:
            _barrier()
            model_state, optim_state = get_state_dict(module, optimizer)
            with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            _barrier()
            if _is_main():
                atomic_write_json(tmp / TRAINER_STATE, trainer_state, indent=1)
                write_manifest(tmp)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        raise _disk_error(e, final, _state_bytes(module, optimizer)) from None
    if _is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def _disk_error(e: BaseException, path: Path, needed: int) -> BaseException:
    """A one-line UserError for a write that failed for lack of space or permission; else `e` itself."""
    code = disk_errno(e)
    if code is None:
        return e
    fix = "free some space" if code in SPACE_ERRNOS else "make the run directory writable"
    return DiskError(
        path, code, needed, what=f"the checkpoint {path}", advice=f"{fix} and continue with --resume"
    )


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint in place into `module` and `optimizer`; returns its trainer state.

    Raises:
        UserError: the checkpoint has no manifest, or matches it but cannot be loaded (one line).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {MANIFEST})")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error in a BaseException
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        reason = ": ".join([type(cause).__name__, *str(cause).strip().splitlines()[:1]])[:200]
        raise UserError(
            f"checkpoint {path} matches its {MANIFEST} but cannot be loaded ({reason}); "
            "it was damaged before its manifest was written, or written by another config: move it aside "
            "to resume from an earlier one, or start again with --restart"
        ) from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return trainer_state
