"""The distillation teacher: frozen, in eval mode, no gradients, no optimizer state, not checkpointed.

It is loaded once per rank straight onto the run's device (in bf16 where the run computes in
bf16), sharded with FSDP2 like the student under `fsdp` (each rank keeps its shard; the output
weight is gathered for the loss) and replicated under DDP. Its tokenizer must be the student's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sheared import run_dir as rf
from sheared.data.tokens import tokenizer_fingerprint
from sheared.errors import UserError
from sheared.model import CausalLM, load_source
from sheared.precision import Precision
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.distributed import DistEnv, load_sharded


def teacher_spec(cfg: PruneConfig | TrainConfig, model_path: Path) -> str:
    """The teacher's source spec: `source` resolved to the model the run's student came from."""
    spec = cfg.distill.teacher
    if spec != "source":
        return spec
    if isinstance(cfg, PruneConfig):
        return cfg.source
    source = rf.read_run_state(model_path).get("source")
    if source is None:
        raise UserError(
            f"distill.teacher is 'source' but {model_path} was not exported by `sheared export` (no "
            f"{rf.RUN_STATE_FILE} naming its source); give the teacher's path instead"
        )
    return source


def load_teacher(
    cfg: PruneConfig | TrainConfig, student_tokenizer, model_path: Path, env: DistEnv, precision: Precision
) -> CausalLM:
    """The frozen teacher model on this rank (sharded under FSDP2)."""
    spec = teacher_spec(cfg, model_path)
    if env.strategy == "fsdp":  # each rank reads only its shard of the teacher
        source = load_sharded(spec, env, activation_checkpointing=False, precision=precision, frozen=True)
    else:
        source = load_source(spec, dtype=precision.teacher_dtype, device=env.device)
    if (
        source.tokenizer is None
        or tokenizer_fingerprint(source.tokenizer)["sha256"]
        != tokenizer_fingerprint(student_tokenizer)["sha256"]
    ):
        theirs = getattr(source.tokenizer, "name_or_path", "none")
        raise UserError(
            f"distill.teacher {spec!r} has another tokenizer ({theirs}) than the student; "
            "distillation compares distributions over the same vocabulary, so use a teacher of the same tokenizer"
        )
    return source.model.eval().requires_grad_(False)


def output_weight(teacher: nn.Module) -> torch.Tensor:
    """The teacher's (V, d) output projection as a plain tensor (gathered when FSDP2 shards it)."""
    weight = teacher.output_weight
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight
