"""The shape and numerics of a decoder, in Hugging Face's vocabulary, and its parameter counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sheared.errors import UserError

# RoPE variants our decoder computes (see `decoder.inv_frequencies`).
ROPE_TYPES = ("default", "linear", "llama3")
# The one list of shape fields (tests/test_layers.py refuses another written out elsewhere).
# The five numbers pruning changes — a target shape — in the order `describe` and tables show them.
TARGET_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
# Every field that describes a model's shape (what `sheared info` and export reports show).
SHAPE_FIELDS = (*TARGET_FIELDS, "head_dim", "vocab_size", "tie_word_embeddings")
# The shape entries of a Hugging Face config (or GGUF header): the shape and the size-related numerics.
CONFIG_SHAPE_FIELDS = (*SHAPE_FIELDS, "rms_norm_eps", "max_position_embeddings")


@dataclass(frozen=True)
class ModelArgs:
    """Everything the decoder needs to know about a LLaMA-family model.

    Field names are those of the Hugging Face configs, so a config maps onto this one to one.
    """

    family: str
    """Model family: `llama` (also SmolLM, TinyLlama), `mistral`, `qwen2` or `qwen3`."""
    vocab_size: int
    """Number of token embeddings (rows of `embed_tokens`)."""
    hidden_size: int
    """Width d of the residual stream."""
    intermediate_size: int
    """Width I of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers L."""
    num_attention_heads: int
    """Number of query heads H."""
    num_key_value_heads: int
    """Number of key/value heads G (= KV groups); H must be a multiple of G."""
    head_dim: int
    """Width of one attention head; never pruned."""
    rms_norm_eps: float = 1e-5
    """Epsilon added to the mean of squares in every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    """Extra RoPE parameters of `rope_type` (e.g. `factor`, `low_freq_factor` for `llama3`)."""
    rope_type: str = "default"
    """One of `default`, `linear`, `llama3`."""
    tie_word_embeddings: bool = False
    """Whether the output projection reuses `embed_tokens.weight`."""
    attention_bias: bool = False
    """Whether q/k/v projections have biases (Qwen2)."""
    qk_norm: bool = False
    """Whether queries and keys get a per-head RMSNorm before RoPE (Qwen3)."""
    max_position_embeddings: int = 4096
    """Longest sequence the source was trained for (kept in exported configs)."""
    sliding_window: int | None = None
    """Mistral-style sliding attention window, or None for full causal attention."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a positive multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one KV head (r = H / G)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> ModelArgs:
        """A copy with some fields changed (used for pruned shapes)."""
        return dataclasses.replace(self, **changes)


def attention_params_per_layer(args: ModelArgs) -> int:
    """Parameters of one attention block: q, k, v, o, plus q/k/v biases and q/k norms where present."""
    d, hd = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    n = d * q + 2 * d * kv + q * d
    if args.attention_bias:
        n += q + 2 * kv
    if args.qk_norm:
        n += 2 * hd
    return n


def mlp_params_per_layer(args: ModelArgs) -> int:
    """Parameters of one SwiGLU MLP: gate, up and down projections."""
    return 3 * args.hidden_size * args.intermediate_size


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Parameter counts of a model with these args, computed from the shape alone.

    Returns:
        `num_params` (total), `num_params_embedding` (embed_tokens, plus lm_head when untied),
        `num_params_non_embedding`, `num_params_attention_per_layer`, `num_params_mlp_per_layer`,
        `num_params_norms` (all RMSNorm weights, q/k norms excluded: they count as attention).
    """
    attn = attention_params_per_layer(args)
    mlp = mlp_params_per_layer(args)
    embedding = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    norms = (2 * args.num_hidden_layers + 1) * args.hidden_size
    non_embedding = args.num_hidden_layers * (attn + mlp) + norms
    return {
        "num_params": embedding + non_embedding,
        "num_params_embedding": embedding,
        "num_params_non_embedding": non_embedding,
        "num_params_attention_per_layer": attn,
        "num_params_mlp_per_layer": mlp,
        "num_params_norms": norms,
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(shape: Any, *, detail: bool = False) -> str:
    """A shape in one line, the way every printer shows it.

    `4 layers, hidden 8, 4 query heads in 2 KV groups, intermediate 16`, and with `detail`
    `..., head_dim 64, vocab 49152, tied embeddings` (the parts the shape has).

    Args:
        shape: a `ModelArgs`, a `TargetShape`, or a mapping with the `SHAPE_FIELDS` keys.
        detail: add head_dim, vocabulary and embedding tying.
    """
    get = shape.get if isinstance(shape, Mapping) else lambda key: getattr(shape, key, None)
    text = (
        f"{_plural(get('num_hidden_layers'), 'layer')}, hidden {get('hidden_size')}, "
        f"{_plural(get('num_attention_heads'), 'query head')} in {_plural(get('num_key_value_heads'), 'KV group')}, "
        f"intermediate {get('intermediate_size')}"
    )
    if detail:
        if get("head_dim") is not None:
            text += f", head_dim {get('head_dim')}"
        if get("vocab_size") is not None:
            text += f", vocab {get('vocab_size')}"
        if get("tie_word_embeddings") is not None:
            text += f", {'tied' if get('tie_word_embeddings') else 'untied'} embeddings"
    return text
