"""AdamW with its parameter groups, and the one learning-rate multiplier all groups share (SPEC §4)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from sheared.train.config import OptimConfig, PruningConfig


def lr_multiplier(
    step: int, total_steps: int, warmup_fraction: float, min_ratio: float, planned_steps: int | None = None
) -> float:
    """Linear warm-up from 0, then cosine from 1 down to `min_ratio` at the last step.

    Args:
        step: the step about to be taken (0-based).
        total_steps: number of optimizer steps.
        warmup_fraction: fraction of the steps spent warming up.
        min_ratio: final multiplier.
        planned_steps: the steps the warm-up was sized for, when a deadline shortened the run to
            `total_steps` (the warm-up keeps its length; only the decay is compressed).
    """
    warmup = round(warmup_fraction * total_steps)
    if planned_steps is not None and planned_steps != total_steps:
        warmup = min(round(warmup_fraction * planned_steps), max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model_params: Iterable[nn.Parameter],
    optim: OptimConfig,
    log_alpha: Iterable[nn.Parameter] = (),
    lambdas: Iterable[nn.Parameter] = (),
    pruning: PruningConfig | None = None,
) -> torch.optim.AdamW:
    """One AdamW with up to three groups: model weights; `log_alpha`; lambdas (`maximize=True`).

    The lambdas climb the Lagrangian (gradient ascent as an explicit optimizer flag, not a negative
    learning rate). No weight decay on masks or multipliers.
    """
    groups = [
        {"params": list(model_params), "lr": optim.lr, "weight_decay": optim.weight_decay, "name": "model"}
    ]
    log_alpha, lambdas = list(log_alpha), list(lambdas)
    if log_alpha:
        assert pruning is not None
        groups.append(
            {"params": log_alpha, "lr": pruning.log_alpha_lr, "weight_decay": 0.0, "name": "log_alpha"}
        )
    if lambdas:
        assert pruning is not None
        groups.append(
            {
                "params": lambdas,
                "lr": pruning.lambda_lr,
                "weight_decay": 0.0,
                "maximize": True,
                "name": "lambda",
            }
        )
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps)


def set_learning_rates(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Scale every group's initial learning rate by the schedule's multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
