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
truncated, missing or changed), says so, moves it aside as `step_N.damaged` and falls back to the
newest intact one. The newest `keep` checkpoints stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sheared.errors import UserError
from sheared.files import TMP_SUFFIX, atomic_write_json, disk_problem, publish_dir, tmp_path
from sheared.train.run_files import RunDir

if TYPE_CHECKING:
    from sheared.pruning import L0Module, LagrangianConstraint

STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DAMAGED_SUFFIX = ".damaged"
HASH_BLOCK_BYTES = 1 << 24


class Trainable(nn.Module):
    """Everything the optimizer updates, under one module so checkpoints name it consistently:
    `model.*` (the decoder), `l0.log_alpha.*` and `lagrangian.lambda1/2.*` (pruning runs only)."""

    def __init__(
        self, model: nn.Module, l0: L0Module | None = None, lagrangian: LagrangianConstraint | None = None
    ):
        super().__init__()
        self.model = model
        self.l0 = l0
        self.lagrangian = lagrangian


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first; not yet verified."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name) and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def _crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            value = zlib.crc32(block, value)
    return value


def write_manifest(folder: Path) -> None:
    """`manifest.json`: the size and CRC-32 of every other file of a checkpoint folder."""
    from sheared.files import atomic_write_json

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    atomic_write_json(folder / MANIFEST, {"files": entries})


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder against its manifest, or None when it is intact."""
    try:
        entries = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is missing or unreadable"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}"
        if _crc32(file) != entry["crc32"]:
            return f"{name} does not match its checksum"
    return None


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that matches its manifest; newer damaged ones are reported on stderr
    and moved aside (`step_N.damaged`) so that they are never mistaken for complete ones."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if _is_main():
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            print(
                f"sheared: checkpoint {path.name} is damaged ({problem}); moved to {aside.name}",
                file=sys.stderr,
            )
        _barrier()
    return None


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
    except Exception as e:
        raise _disk_error(e, tmp_path(final), _state_bytes(module, optimizer)) from None
    if _is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def _disk_error(e: Exception, path: Path, needed: int) -> Exception:
    """A one-line UserError for a write that failed for lack of space or permission; else `e` itself."""
    problem = disk_problem(e)
    if problem is None:
        return e
    return UserError(
        f"cannot write the checkpoint {path} ({problem}); it needs about {needed / 2**20:,.0f} MiB; "
        "free some space and continue with --resume"
    )


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint in place into `module` and `optimizer`; returns its trainer state."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {MANIFEST})")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((path / TRAINER_STATE).read_text())


def load_module_weights(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load only the module part of a checkpoint (for export); returns its trainer state.

    The checkpoint is verified against its manifest first (a damaged one is a UserError).
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(
            f"checkpoint {path} is damaged or incomplete: {problem}; export an earlier checkpoint"
        )
    state = {"model": module.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    module.load_state_dict(state["model"])
    return json.loads((path / TRAINER_STATE).read_text())
