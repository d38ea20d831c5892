"""The target shape, its validation against the source, and the mask types it needs (SPEC §2–§3)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sheared.errors import UserError
from sheared.model.args import TARGET_FIELDS, ModelArgs

# Mask types in the order they are created and reported; names equal the `Masks` fields.
MASK_TYPES = ("layer", "kv_group", "head", "intermediate", "hidden")
# The five numbers of a target shape, in the order `describe` and tables show them.
SHAPE_KEYS = TARGET_FIELDS
# The kinds of budget a target may be given as instead (exactly one of them).
BUDGET_KINDS = ("params", "params_fraction", "memory_mb")
# Bytes per weight of `memory_mb` budgets; int8 stands for q8-like formats (their per-block
# scales, about 6% more for llama.cpp's q8_0, are not counted).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
BYTES_PER_MB = 10**6  # memory_mb counts SI megabytes
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")


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
        for name in SHAPE_KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"target {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"target num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def of(cls, shape: Any) -> TargetShape:
        """The five numbers of a `ModelArgs` (or any object or mapping with them)."""
        get = shape.get if isinstance(shape, Mapping) else lambda key: getattr(shape, key)
        return cls(**{k: get(k) for k in SHAPE_KEYS})

    def as_dict(self) -> dict[str, int]:
        """The five numbers by name, in `SHAPE_KEYS` order."""
        return {k: getattr(self, k) for k in SHAPE_KEYS}

    @property
    def heads_per_group(self) -> int:
        """Query heads per kept KV group, r_T = H_T / G_T."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, source: ModelArgs) -> None:
        """Refuse a target that the source cannot be pruned to, naming the number and the limit."""
        for name in SHAPE_KEYS:
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
        return source.replace(**self.as_dict())


def parse_count(text: int | float | str, what: str = "params") -> int:
    """A parameter count from `60M`, `1.3B`, `60_000_000`, `6e7` or a number; UserError otherwise."""
    if isinstance(text, bool):
        raise UserError(f"{what} must be a parameter count such as 60M, 1.3B or 60_000_000, got {text!r}")
    if isinstance(text, int | float):
        number = float(text)
    else:
        match = _COUNT.match(str(text))
        if match is None:
            raise UserError(f"{what} must be a parameter count such as 60M, 1.3B or 60_000_000, got {text!r}")
        number = float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).upper()]
    if not math.isfinite(number) or number < 1 or not float(number).is_integer():
        raise UserError(f"{what} must be a whole positive number of parameters, got {text!r}")
    return int(number)


@dataclass
class TargetBudget:
    """A target given as a budget: exactly one of `params`, `params_fraction`, `memory_mb`.

    The run resolves it to the best uniform `TargetShape` within `BUDGET_TOLERANCE` of the budget
    (`sheared.pruning.search`; docs/method.md, "Budget targets").
    """

    params: int | str | None = None
    """Total parameters of the pruned model, embeddings included: `60M`, `1.3B`, `60_000_000`."""
    params_fraction: float | None = None
    """Share in (0, 1) of the source's non-embedding parameters (attention, MLP and norms; not
    `embed_tokens` or `lm_head`) that the pruned model keeps."""
    memory_mb: float | None = None
    """Size of all the pruned model's weights, embeddings included, in MB (10^6 bytes) at `dtype`."""
    dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = None
    """Bytes per weight of `memory_mb` (4, 2, 2, 1; int8 for q8-like formats, scales not counted)."""

    def __post_init__(self) -> None:
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise UserError(
                f"a budget gives exactly one of params, params_fraction or memory_mb, got {which}"
            )
        if self.params is not None:
            self.params = parse_count(self.params, "params")
        if self.params_fraction is not None and not 0 < self.params_fraction < 1:
            raise UserError(
                f"params_fraction must be between 0 and 1 (exclusive), got {self.params_fraction}"
            )
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise UserError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.memory_mb is not None:
            if not math.isfinite(self.memory_mb) or self.memory_mb <= 0:
                raise UserError(f"memory_mb must be a positive number, got {self.memory_mb}")
            if self.dtype is None:
                raise UserError(f"memory_mb needs a dtype: one of {', '.join(DTYPE_BYTES)}")
        elif self.dtype is not None:
            raise UserError(f"dtype ({self.dtype}) applies to memory_mb only")

    @property
    def kind(self) -> str:
        """Which budget is given: `params`, `params_fraction` or `memory_mb`."""
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    def amount(self, counts: dict[str, int]) -> float:
        """What the budget measures of a model with these `parameter_counts`: total parameters,
        non-embedding parameters, or MB of weights at `dtype`."""
        if self.kind == "params":
            return float(counts["num_params"])
        if self.kind == "params_fraction":
            return float(counts["num_params_non_embedding"])
        return counts["num_params"] * DTYPE_BYTES[self.dtype] / BYTES_PER_MB

    def goal(self, source_counts: dict[str, int]) -> float:
        """The budget in the unit of `amount`, for a source with these `parameter_counts`."""
        if self.kind == "params_fraction":
            return self.params_fraction * source_counts["num_params_non_embedding"]
        return float(self.params if self.kind == "params" else self.memory_mb)

    def describe(self) -> str:
        """One line: `params 60,000,000`, `params_fraction 0.5 of the non-embedding parameters`, ..."""
        if self.kind == "params":
            return f"params {self.params:,}"
        if self.kind == "params_fraction":
            return f"params_fraction {self.params_fraction:g} of the non-embedding parameters"
        return f"memory_mb {self.memory_mb:g} at {self.dtype}"


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
