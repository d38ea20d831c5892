"""The structured masks the decoder applies (SPEC §2), as plain tensors.

The decoder never creates or learns masks: the pruning code samples them and hands a `Masks`
object to `CausalLM.forward`. Any field may be None (that structure is not pruned).

| field          | shape       | multiplies                                                      |
|----------------|-------------|-----------------------------------------------------------------|
| `layer`        | (L,)        | attention output and MLP output of layer l                      |
| `kv_group`     | (L, G)      | every query head's output of KV group g (before `o_proj`)        |
| `head`         | (L, G, r)   | query head j of group g's output (before `o_proj`)               |
| `intermediate` | (L, I)      | the gated product act(gate) * up, before `down_proj`             |
| `hidden`       | (d,)        | embedding output, every RMSNorm output, every attn/MLP output    |

Query head h of a GQA layer belongs to group g = h // r and is head j = h % r of it, the same
order Hugging Face uses when one KV head serves r consecutive query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch


@dataclass
class Masks:
    """Mask values for one forward pass; see the module docstring for shapes and semantics."""

    layer: torch.Tensor | None = None
    """(L,) one value per decoder layer."""
    kv_group: torch.Tensor | None = None
    """(L, G) one value per key/value head of every layer."""
    head: torch.Tensor | None = None
    """(L, G, r) one value per query head, grouped by the KV head it reads."""
    intermediate: torch.Tensor | None = None
    """(L, I) one value per MLP channel of every layer."""
    hidden: torch.Tensor | None = None
    """(d,) one value per residual-stream dimension, shared by all layers."""

    def names(self) -> list[str]:
        """Names of the mask types that are set."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to(self, dtype: torch.dtype | torch.device) -> Masks:
        """The same masks cast to `dtype` (the activations' dtype) or moved to a device."""
        return Masks(**{f.name: _cast(getattr(self, f.name), dtype) for f in fields(self)})

    def for_layer(
        self,
        layer: int,
        num_key_value_heads: int,
        heads_per_group: int,
        hidden_kept: torch.Tensor | None = None,
    ) -> LayerMasks:
        """The per-layer slices, with the group and head masks folded into one per-query-head scale.

        `hidden_kept` are the indices of the nonzero hidden-mask entries (for the masked RMSNorm).
        """
        head_scale = None
        if self.kv_group is not None or self.head is not None:
            g = self.kv_group[layer][:, None] if self.kv_group is not None else 1.0  # (G, 1)
            j = self.head[layer] if self.head is not None else 1.0  # (G, r)
            head_scale = torch.broadcast_to(g * j, (num_key_value_heads, heads_per_group)).reshape(-1)  # (H,)
        return LayerMasks(
            layer=None if self.layer is None else self.layer[layer],
            head_scale=head_scale,
            intermediate=None if self.intermediate is None else self.intermediate[layer],
            hidden=self.hidden,
            hidden_kept=hidden_kept,
        )


class LayerMasks(NamedTuple):
    """The masks one decoder layer applies (a tuple so activation checkpointing passes it through)."""

    layer: torch.Tensor | None
    """() scale of this layer's attention and MLP outputs."""
    head_scale: torch.Tensor | None
    """(H,) kv_group * head for every query head, in Hugging Face head order."""
    intermediate: torch.Tensor | None
    """(I,) scale of every MLP channel."""
    hidden: torch.Tensor | None
    """(d,) scale of every residual-stream dimension."""
    hidden_kept: torch.Tensor | None = None
    """(d_kept,) indices of the nonzero entries of `hidden`."""


NO_LAYER_MASKS = LayerMasks(None, None, None, None)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
