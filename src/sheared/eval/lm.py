"""Language-model loss, perplexity and greedy generation for our decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sheared.model import CausalLM, Masks

IGNORE_INDEX = -100  # label of positions without a next token (cross_entropy's default ignore_index)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from the logits at t, in float32.

    The labels are shifted instead of the logits, so the (B, T, V) logits are never copied.

    Args:
        logits: (B, T, V).
        input_ids: (B, T) the same tokens the logits were computed from.
        reduction: `mean` over the B * (T - 1) predictions, or `sum`.
    """
    labels = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T), last position ignored
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


@torch.no_grad()
def perplexity(model: CausalLM, input_ids: torch.Tensor, masks: Masks | None = None) -> float:
    """exp(mean next-token loss) of token ids (B, T)."""
    return math.exp(next_token_loss(model(input_ids, masks), input_ids).item())


@torch.no_grad()
def greedy_generate(
    model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """Greedy continuation of (1, T) token ids; returns only the new ids (1, n <= max_new_tokens).

    Recomputes the whole prefix each step (no KV cache): meant for short demo continuations.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        next_id = model(ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, next_id], dim=1)
        if eos_token_id is not None and next_id.item() == eos_token_id:
            break
    return ids[:, input_ids.shape[1] :]
