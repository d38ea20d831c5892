"""Compaction: binary masks -> physically smaller weights (SPEC §6).

Drop layers whose layer mask is 0 and renumber the rest; in each kept layer keep the chosen KV
groups (rows of k/v, their query heads' rows of q and columns of o), the chosen query heads inside
them, the chosen intermediate rows of gate/up and columns of down; keep the chosen hidden columns
of the embedding, q/k/v, gate/up and `lm_head`, rows of o/down, and entries of every RMSNorm.
Biases follow their rows; q/k norms (per head_dim) are unchanged.

Works on state dicts with Hugging Face names and allows a different number of kept structures
per layer (the parameter-count identity is tested that way); an export additionally requires the
exact target counts, which makes the result a standard config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sheared.model.args import ModelArgs
from sheared.model.masks import Masks
from sheared.pruning.target import TargetShape


@dataclass(frozen=True)
class LayerKeep:
    """What one kept layer keeps (indices into the source layer)."""

    source_index: int
    """Index of this layer in the source."""
    kv_heads: list[int]
    """Kept KV heads (groups), ascending."""
    query_heads: list[int]
    """Kept query heads (h = g * r + j), ascending; grouped by kept KV head."""
    intermediate: list[int]
    """Kept MLP channels, ascending."""


@dataclass(frozen=True)
class KeptStructure:
    """Everything the masks keep."""

    layers: list[LayerKeep]
    hidden: list[int]
    """Kept residual dimensions, ascending."""

    def shape(self) -> TargetShape:
        """The shape of the model these structures make (every kept layer keeps as many of each)."""
        first = self.layers[0]
        return TargetShape(
            len(self.layers),
            len(self.hidden),
            len(first.query_heads),
            len(first.kv_heads),
            len(first.intermediate),
        )

    def summary(self) -> dict:
        """Readable counts: kept layers, and per kept layer its KV heads, query heads, channels."""
        return {
            "kept_layers": [k.source_index for k in self.layers],
            "hidden_size": len(self.hidden),
            "per_layer": [
                {
                    "layer": k.source_index,
                    "kv_heads": k.kv_heads,
                    "query_heads": k.query_heads,
                    "intermediate_size": len(k.intermediate),
                }
                for k in self.layers
            ],
        }


def _kept(mask: torch.Tensor | None, size: int) -> list[int]:
    if mask is None:
        return list(range(size))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}, "compaction needs binary masks"
    return torch.nonzero(mask).flatten().tolist()


def kept_structure(args: ModelArgs, masks: Masks) -> KeptStructure:
    """Indices kept by binary `masks` (None fields keep everything)."""
    G, r = args.num_key_value_heads, args.heads_per_group
    layers = []
    for layer in _kept(masks.layer, args.num_hidden_layers):
        groups = _kept(None if masks.kv_group is None else masks.kv_group[layer], G)
        heads = []
        for g in groups:
            heads += [g * r + j for j in _kept(None if masks.head is None else masks.head[layer, g], r)]
        intermediate = _kept(
            None if masks.intermediate is None else masks.intermediate[layer], args.intermediate_size
        )
        layers.append(LayerKeep(layer, groups, heads, intermediate))
    return KeptStructure(layers, _kept(masks.hidden, args.hidden_size))


def _rows_of_heads(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def slice_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, kept: KeptStructure
) -> dict[str, torch.Tensor]:
    """The state dict of the compacted model (new layer numbering), as contiguous copies (made once:
    the compacted model can take them with `load_state_dict(..., assign=True)`)."""
    hidden = torch.tensor(kept.hidden, dtype=torch.long)
    hd = args.head_dim
    out = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"][:, hidden],
        "model.norm.weight": state["model.norm.weight"][hidden],
    }
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"][:, hidden]
    for new, keep in enumerate(kept.layers):
        src, dst = f"model.layers.{keep.source_index}.", f"model.layers.{new}."
        q_rows = _rows_of_heads(keep.query_heads, hd)
        kv_rows = _rows_of_heads(keep.kv_heads, hd)
        channels = torch.tensor(keep.intermediate, dtype=torch.long)
        attn = "self_attn."
        out[dst + attn + "q_proj.weight"] = state[src + attn + "q_proj.weight"][q_rows][:, hidden]
        out[dst + attn + "k_proj.weight"] = state[src + attn + "k_proj.weight"][kv_rows][:, hidden]
        out[dst + attn + "v_proj.weight"] = state[src + attn + "v_proj.weight"][kv_rows][:, hidden]
        out[dst + attn + "o_proj.weight"] = state[src + attn + "o_proj.weight"][hidden][:, q_rows]
        if args.attention_bias:
            out[dst + attn + "q_proj.bias"] = state[src + attn + "q_proj.bias"][q_rows]
            out[dst + attn + "k_proj.bias"] = state[src + attn + "k_proj.bias"][kv_rows]
            out[dst + attn + "v_proj.bias"] = state[src + attn + "v_proj.bias"][kv_rows]
        if args.qk_norm:
            out[dst + attn + "q_norm.weight"] = state[src + attn + "q_norm.weight"].clone()
            out[dst + attn + "k_norm.weight"] = state[src + attn + "k_norm.weight"].clone()
        out[dst + "mlp.gate_proj.weight"] = state[src + "mlp.gate_proj.weight"][channels][:, hidden]
        out[dst + "mlp.up_proj.weight"] = state[src + "mlp.up_proj.weight"][channels][:, hidden]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.down_proj.weight"][hidden][:, channels]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[dst + norm + ".weight"] = state[src + norm + ".weight"][hidden]
    return out  # indexing by index tensors copies, so every entry is already a contiguous copy
