"""Per-domain evaluation: token-weighted mean next-token cross-entropy on held-out sequences.

The same function serves dynamic batch loading (during pruning under deterministic masks, during
continued pretraining without) and `sheared eval`. Under data parallelism each rank evaluates its
own contiguous share of every domain, every rank runs the same number of forward passes (ranks
that run out repeat a sequence with weight 0, so sharded models never wait on each other), and
the per-domain sums are all-reduced.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist

from sheared.eval.lm import next_token_loss
from sheared.model import Masks


class SequenceSource(Protocol):
    """What evaluation needs from prepared data (`sheared.data.tokens.PreparedData` has it)."""

    domains: list[str]

    def num_sequences(self, domain: str, split: str) -> int: ...

    def sequences(self, domain: str, split: str, indices) -> torch.Tensor: ...


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    data: SequenceSource,
    *,
    split: str = "eval",
    batch_size: int = 8,
    masks: Masks | None = None,
    max_sequences: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean next-token loss per domain, weighted by tokens, summed over data-parallel ranks.

    Args:
        model: maps token ids (B, T) (and `masks`) to logits (B, T, V).
        data: prepared data with the `split` of every domain.
        split: which split to evaluate.
        batch_size: sequences per forward pass.
        masks: masks passed to every forward pass (None = unmasked).
        max_sequences: evaluate at most this many sequences per domain (None = all).
        device: where the batches go.
        autocast_dtype: run the forward passes under autocast to this dtype (None = no autocast).

    Returns:
        domain -> loss in nats per token.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device)
    sums = torch.zeros(len(data.domains), dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
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
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(ids, masks) if masks is not None else model(ids)
            sums[d] += weight * next_token_loss(logits, ids, reduction="sum").double()
            counts[d] += weight * ids.shape[0] * (ids.shape[1] - 1)
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return {domain: (sums[d] / counts[d]).item() for d, domain in enumerate(data.domains)}
