"""Checkpoints: atomic, sharded-capable (torch distributed checkpoint), resumable exactly.

Layout of `RUN_DIR/checkpoints/step_000100/`:

    *.distcp, .metadata     model, masks (log_alpha), Lagrange multipliers and optimizer state,
                            written by torch.distributed.checkpoint (one shard per rank under FSDP)
    trainer_state.json      step, tokens, sampler state (weights, positions), DBL history,
                            reference losses, world size

A checkpoint is written into `step_000100.tmp/`, every file is fsynced, and the folder is renamed
when complete, so a folder without `.tmp` is always whole. The newest `keep` checkpoints stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sheared.errors import UserError
from sheared.files import TMP_SUFFIX, fsync_tree
from sheared.train.run_files import RunDir

if TYPE_CHECKING:
    from sheared.pruning import L0Module, LagrangianConstraint

STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"


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
    """Complete checkpoints of a run, oldest first."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and STEP_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


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
    tmp = root / (checkpoint_name(step) + TMP_SUFFIX)
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        fsync_tree(tmp)
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint in place into `module` and `optimizer`; returns its trainer state."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads(state_file.read_text())


def load_module_weights(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load only the module part of a checkpoint (for export); returns its trainer state."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    state = {"model": module.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    module.load_state_dict(state["model"])
    return json.loads(state_file.read_text())
