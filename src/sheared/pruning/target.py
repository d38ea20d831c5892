"""The target shape, its validation against the source, and the mask types it needs (SPEC §2–§3)."""

from __future__ import annotations

from dataclasses import dataclass

from sheared.errors import UserError
from sheared.model.args import ModelArgs

# Mask types in the order they are created and reported; names equal the `Masks` fields.
MASK_TYPES = ("layer", "kv_group", "head", "intermediate", "hidden")


@dataclass
class TargetShape:
    """The exact shape the pruned model must have; `num_` fields as in Hugging Face configs."""

    num_hidden_layers: int
    """Layers L_T to keep (1 ≤ L_T ≤ L)."""
    hidden_size: int
    """Residual width d_T (≤ d)."""
    num_attention_heads: int
    """Query heads H_T (a multiple of num_key_value_heads; H_T / G_T ≤ H / G)."""
    num_key_value_heads: int
    """KV heads (= KV groups) G_T (≤ G)."""
    intermediate_size: int
    """MLP width I_T (≤ I)."""

    def __post_init__(self) -> None:
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"target {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"target num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def heads_per_group(self) -> int:
        """Query heads per kept KV group, r_T = H_T / G_T."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, source: ModelArgs) -> None:
        """Refuse a target that the source cannot be pruned to, naming the number and the limit."""
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
        ):
            if getattr(self, name) > getattr(source, name):
                raise UserError(
                    f"target {name}={getattr(self, name)} exceeds the source's {getattr(source, name)}; "
                    f"it must be at most {getattr(source, name)}"
                )
        if self.heads_per_group > source.heads_per_group:
            raise UserError(
                f"target has {self.heads_per_group} query heads per KV group "
                f"({self.num_attention_heads}/{self.num_key_value_heads}) but the source has "
                f"{source.heads_per_group} ({source.num_attention_heads}/{source.num_key_value_heads}); "
                f"choose num_attention_heads ≤ {source.heads_per_group} × num_key_value_heads"
            )

    def model_args(self, source: ModelArgs) -> ModelArgs:
        """The source's args with this shape (head_dim, family and numerics unchanged)."""
        return source.replace(
            num_hidden_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
        )


@dataclass(frozen=True)
class MaskSpec:
    """One mask type: its shape and how many entries of each row the target keeps."""

    name: str
    """One of MASK_TYPES."""
    shape: tuple[int, ...]
    """Full shape, e.g. (L, G, r) for heads."""
    target_kept: int
    """Entries kept per row (last dimension) at the target."""

    @property
    def row_size(self) -> int:
        return self.shape[-1]

    @property
    def target_sparsity(self) -> float:
        """t_m = 1 - target_count / source_count."""
        return 1.0 - self.target_kept / self.row_size


def mask_specs(source: ModelArgs, target: TargetShape) -> list[MaskSpec]:
    """The mask types the target needs: one per dimension it shrinks, in MASK_TYPES order.

    For an MHA source (G = H, r = 1) the KV-group mask is exactly the per-head mask of the
    original method and no head mask exists.
    """
    target.validate(source)
    L, G, r = source.num_hidden_layers, source.num_key_value_heads, source.heads_per_group
    candidates = [
        MaskSpec("layer", (L,), target.num_hidden_layers),
        MaskSpec("kv_group", (L, G), target.num_key_value_heads),
        MaskSpec("head", (L, G, r), target.heads_per_group),
        MaskSpec("intermediate", (L, source.intermediate_size), target.intermediate_size),
        MaskSpec("hidden", (source.hidden_size,), target.hidden_size),
    ]
    return [spec for spec in candidates if spec.target_kept < spec.row_size]
