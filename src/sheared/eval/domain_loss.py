"""Per-domain evaluation: token-weighted mean next-token cross-entropy on held-out sequences.

The same function serves dynamic batch loading (during pruning under deterministic masks, during
continued pretraining without) and `sheared eval`. Under data parallelism each rank evaluates its
own contiguous share of every domain, every rank runs the same number of forward passes (ranks
that run out repeat a sequence with weight 0, so sharded models never wait on each other), and
the per-domain sums are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from sheared.eval.loss import fused_loss, next_token_labels
from sheared.model import Masks


class SequenceSource(Protocol):
    """What evaluation needs from prepared data (`sheared.data.tokens.PreparedData` has it)."""

    domains: list[str]

    def num_sequences(self, domain: str, split: str) -> int: ...

    def sequences(self, domain: str, split: str, indices) -> torch.Tensor: ...


class DomainMetrics(NamedTuple):
    """Per-domain eval metrics, in nats per predicted token."""

    loss: dict[str, float]
    """domain -> next-token cross-entropy."""
    kl: dict[str, float] | None
    """domain -> KL(teacher ‖ model) at temperature 1, or None without a teacher."""


def _hidden_states(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden


@torch.no_grad()
def domain_metrics(
    model: torch.nn.Module,
    data: SequenceSource,
    *,
    split: str = "eval",
    batch_size: int = 8,
    masks: Masks | None = None,
    max_sequences: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    teacher: torch.nn.Module | None = None,
    teacher_weight: Callable[[], torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> DomainMetrics:
    """Token-weighted mean loss (and KL to a teacher) per domain, summed over data-parallel ranks.

    Args:
        model: our decoder (possibly wrapped): `model(ids, masks, head=...)` (see `CausalLM.forward`).
        data: prepared data with the `split` of every domain.
        split: which split to evaluate.
        batch_size: sequences per forward pass.
        masks: masks passed to every forward pass (None = unmasked).
        max_sequences: evaluate at most this many sequences per domain (None = all).
        device: where the batches go.
        autocast_dtype: run the forward passes under autocast to this dtype (None = no autocast).
        teacher: a frozen teacher of the same vocabulary, for the per-domain KL.
        teacher_weight: returns the teacher's (V, d) output weight (gathered when sharded).
        chunk_size: tokens per chunk of the fused loss (None: its default).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device)
    sums = torch.zeros(3, len(data.domains), dtype=torch.float64, device=device)  # ce, kd, tokens
    for d, domain in enumerate(data.domains):
        total = data.num_sequences(domain, split)
        if max_sequences is not None:
            total = min(total, max_sequences)
        share = math.ceil(total / world)
        mine = list(range(rank * share, min((rank + 1) * share, total)))
        for start in range(0, share, batch_size):
            indices = mine[start : start + batch_size]
            weight = 1.0 if indices else 0.0
            ids = data.sequences(domain, split, indices or [0]).to(device)
            labels = next_token_labels(ids)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                t_hidden = None if teacher is None else teacher(ids, head=_hidden_states)
                t_weight = None if teacher is None else teacher_weight()

                def head(h, w, labels=labels, t_hidden=t_hidden, t_weight=t_weight):
                    return fused_loss(
                        h,
                        w,
                        labels,
                        teacher_hidden=t_hidden,
                        teacher_weight=t_weight,
                        chunk_size=chunk_size,
                        reduction="sum",
                    )

                parts = model(ids, masks, head=head)
            sums[:, d] += weight * torch.stack(
                [t.double() for t in (parts.ce, parts.kd, parts.num_predicted)]
            ).to(device)
    if distributed:
        dist.all_reduce(sums)
    ce, kd, tokens = sums
    loss = {domain: (ce[d] / tokens[d]).item() for d, domain in enumerate(data.domains)}
    kl = (
        None
        if teacher is None
        else {domain: (kd[d] / tokens[d]).item() for d, domain in enumerate(data.domains)}
    )
    return DomainMetrics(loss, kl)


def domain_losses(model: torch.nn.Module, data: SequenceSource, **kw) -> dict[str, float]:
    """Mean next-token loss per domain (`domain_metrics(...).loss`); same arguments, no teacher."""
    return domain_metrics(model, data, **kw).loss
