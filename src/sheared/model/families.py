"""The supported model families and the mapping between Hugging Face configs and `ModelArgs`.

Family differences are data here, not branches in the decoder: Qwen2 has q/k/v biases, Qwen3 a
per-head RMSNorm on queries and keys, Mistral an optional sliding window; everything else is the
LLaMA architecture (SmolLM, SmolLM2 and TinyLlama are `llama` configs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from sheared.errors import UserError
from sheared.model.args import CONFIG_SHAPE_FIELDS, ROPE_TYPES, ModelArgs


@dataclass(frozen=True)
class Family:
    """What distinguishes one supported family from plain LLaMA."""

    model_type: str
    """Hugging Face `model_type` (kept in exported configs)."""
    architecture: str
    """Hugging Face class name written into `architectures`."""
    qkv_bias: bool
    """q/k/v projections carry biases."""
    qk_norm: bool
    """Per-head RMSNorm on queries and keys before RoPE."""
    examples: str
    """Models of this family, for messages and docs."""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", False, False, "LLaMA 1/2/3.x, SmolLM/SmolLM2, TinyLlama"),
    "mistral": Family("mistral", "MistralForCausalLM", False, False, "Mistral 7B"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", True, False, "Qwen2, Qwen2.5"),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", False, True, "Qwen3 (dense)"),
}


def get_family(model_type: str, where: str = "") -> Family:
    """The family of a `model_type`, or a one-line error listing the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k} ({f.examples})" for k, f in FAMILIES.items())
        raise UserError(
            f"unsupported model family {model_type!r}{f' in {where}' if where else ''}; "
            f"supported: {supported}"
        )
    return FAMILIES[model_type]


def _rope_from_config(config: PretrainedConfig, where: str) -> tuple[str, float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.pop("rope_type", "default") or "default"
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", 10000.0)
    if rope_type not in ROPE_TYPES:
        raise UserError(f"unsupported RoPE type {rope_type!r} in {where}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "linear":
        params = {"factor": float(params["factor"])}
    elif rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        params = {k: params[k] for k in keys}
    else:
        params = {}
    return rope_type, float(theta), params


def args_from_hf_config(config: PretrainedConfig, where: str = "config.json") -> ModelArgs:
    """`ModelArgs` of a Hugging Face config of a supported family, refusing what we cannot compute."""
    family = get_family(config.model_type, where)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act {config.hidden_act!r} in {where}; supported: silu")
    if family.model_type in ("llama", "qwen3") and getattr(config, "attention_bias", False):
        raise UserError(f"attention_bias=true in {where} is not supported (o_proj bias); supported: false")
    if getattr(config, "mlp_bias", False):
        raise UserError(f"mlp_bias=true in {where} is not supported; supported: false")
    if getattr(config, "use_sliding_window", False):
        raise UserError(f"use_sliding_window=true in {where} is not supported; supported: false")
    rope_type, theta, rope_scaling = _rope_from_config(config, where)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sliding_window = getattr(config, "sliding_window", None) if family.model_type == "mistral" else None
    return ModelArgs(
        family=family.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=sliding_window,
    )


# Entries of a source config that describe a file, a quantization or a load, not the model.
_DROPPED_KEYS = (
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "layer_types",  # per-layer list (Qwen2/3); regenerated for the new depth (all full attention)
)


def hf_config_from_args(args: ModelArgs, base: dict[str, Any] | None = None) -> PretrainedConfig:
    """A Hugging Face config of `args`' family; other entries (token ids, ...) are kept from `base`.

    `head_dim` is always written explicitly: a pruned model's hidden size need not equal
    heads * head_dim.
    """
    family = get_family(args.family)
    values = {k: v for k, v in (base or {}).items() if k not in _DROPPED_KEYS and k != "model_type"}
    values.update({k: getattr(args, k) for k in CONFIG_SHAPE_FIELDS})  # replaced for the new args
    values["rope_parameters"] = {
        "rope_type": args.rope_type,
        "rope_theta": args.rope_theta,
        **args.rope_scaling,
    }
    values.pop("rope_scaling", None)
    values.pop("rope_theta", None)
    values["architectures"] = [family.architecture]
    values["hidden_act"] = "silu"
    if family.model_type == "mistral":
        values["sliding_window"] = args.sliding_window
    if family.model_type in ("llama", "qwen3"):
        values["attention_bias"] = False
    if family.model_type == "llama":
        values["mlp_bias"] = False
    return AutoConfig.for_model(family.model_type, **values)
