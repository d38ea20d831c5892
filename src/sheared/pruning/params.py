"""Expected parameter count of a masked model (SPEC §3), differentiable in the mask scores."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sheared.model.args import ModelArgs


def expected_num_params(args: ModelArgs, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Expected total parameters given per-structure keep probabilities, in float64.

    With per-element scores s (a missing mask type counts as all ones), for layer l:
    q_l = sum_g s_group[l, g] * sum_j s_head[l, g, j] expected query heads, k_l = sum_g s_group[l, g]
    expected KV heads, d_e = sum s_hidden expected hidden size, and

        attn_l = s_layer[l] * head_dim * d_e * (2 q_l + 2 k_l)   (+ q/k/v biases, q/k norms)
        mlp_l  = s_layer[l] * 3 * d_e * sum_k s_int[l, k]
        norms  = sum_l s_layer[l] * 2 * d_e + d_e
        total  = sum_l (attn_l + mlp_l) + norms + V * d_e (x2 when untied)

    With scores exactly 0/1 this is the parameter count of the physically sliced model.

    Args:
        args: the source shape.
        scores: mask name -> scores of that mask's shape (see `MaskSpec`).
    """
    L, G, r = args.num_hidden_layers, args.num_key_value_heads, args.heads_per_group
    ref = next(iter(scores.values()), None)
    device = ref.device if ref is not None else None

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = scores.get(name)
        return torch.ones(shape, dtype=torch.float64, device=device) if value is None else value.double()

    s_layer = get("layer", (L,))
    s_group = get("kv_group", (L, G))
    s_head = get("head", (L, G, r))
    s_int = get("intermediate", (L, args.intermediate_size))
    d_e = get("hidden", (args.hidden_size,)).sum()
    hd = args.head_dim

    q = (s_group * s_head.sum(-1)).sum(-1)  # (L,) expected query heads
    k = s_group.sum(-1)  # (L,) expected KV heads
    attn = hd * d_e * (2 * q + 2 * k)
    if args.attention_bias:
        attn = attn + hd * (q + 2 * k)
    if args.qk_norm:
        attn = attn + 2 * hd
    mlp = 3 * d_e * s_int.sum(-1)
    per_layer = s_layer * (attn + mlp + 2 * d_e)  # (L,) incl. the two RMSNorms of the layer
    embeddings = args.vocab_size * d_e * (1 if args.tie_word_embeddings else 2)
    return per_layer.sum() + d_e + embeddings
