"""The decoder: one compact LLaMA-family implementation with Hugging Face parameter names.

Architecture only. It applies a `Masks` object it is given (SPEC §2) and knows nothing about how
masks are learned, how data is loaded or how the model is parallelised. Unmasked, it computes
what `transformers`' Llama/Mistral/Qwen2/Qwen3 models compute for the same weights.

Shapes: B batch, T sequence, d hidden, H query heads, G KV heads, r = H / G, D head_dim,
I intermediate, V vocab.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sheared.model.args import ModelArgs
from sheared.model.masks import NO_LAYER_MASKS, LayerMasks, Masks

INIT_STD = 0.02  # normal init of random models, as Hugging Face's `initializer_range` default


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    hidden: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm in float32, optionally masked.

    With a hidden mask, the mean of squares runs over the dimensions whose mask is nonzero only
    (the others are zero in the residual stream anyway), so a masked model computes what the
    physically smaller model computes; the output is then multiplied by the mask. The kept
    dimensions are gathered first, so the reduction is the very one the smaller model runs.

    Args:
        x: (..., d) activations.
        weight: (d,) norm weight.
        eps: added to the mean of squares.
        hidden: (d,) hidden mask or None.
        kept: (d_kept,) indices of the nonzero entries of `hidden` (computed when not given).
    """
    dtype = x.dtype
    x32 = x.float()
    if hidden is None:
        variance = x32.pow(2).mean(-1, keepdim=True)
    else:
        kept = torch.nonzero(hidden).squeeze(-1) if kept is None else kept
        variance = x32.index_select(-1, kept).pow(2).mean(-1, keepdim=True)
    out = weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)
    return out if hidden is None else out * hidden


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; `forward` takes an optional hidden mask."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, hidden: torch.Tensor | None = None, kept: torch.Tensor | None = None
    ) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, hidden, kept)


def inv_frequencies(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """RoPE inverse frequencies (D/2,) in float32, for `default`, `linear` and `llama3` RoPE."""
    dim = args.head_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    if args.rope_type == "linear":
        return inv_freq / args.rope_scaling["factor"]
    if args.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        p = args.rope_scaling
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_context = p["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    args: ModelArgs, seq_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, D) for positions 0..T-1, computed in float32 then cast to `dtype`."""
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_frequencies(args, device)[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, n, D) queries or keys by position, the `rotate_half` layout of Hugging Face."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention; the head mask scales each query head's output before `o_proj`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.sliding_window = args.sliding_window
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_scale: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, G, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, D)
        mask, causal = None, True
        if self.sliding_window is not None and self.sliding_window < T:
            i = torch.arange(T, device=x.device)
            distance = i[:, None] - i[None, :]
            mask, causal = (distance >= 0) & (distance < self.sliding_window), False  # (T, T)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.head_dim**-0.5,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, T, D)
        out = out.transpose(1, 2)  # (B, T, H, D)
        if head_scale is not None:
            out = out * head_scale[:, None]  # kv_group * head mask per query head
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU MLP; the intermediate mask scales the gated product before `down_proj`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor, intermediate: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)
        if intermediate is not None:
            h = h * intermediate
        return self.down_proj(h)


def _scale(x: torch.Tensor, *factors: torch.Tensor | None) -> torch.Tensor:
    for f in factors:
        if f is not None:
            x = x * f
    return x


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); layer and hidden masks on both outputs."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: LayerMasks = NO_LAYER_MASKS
    ) -> torch.Tensor:
        h = self.self_attn(
            self.input_layernorm(x, masks.hidden, masks.hidden_kept), cos, sin, masks.head_scale
        )
        x = x + _scale(h, masks.layer, masks.hidden)
        h = self.mlp(self.post_attention_layernorm(x, masks.hidden, masks.hidden_kept), masks.intermediate)
        return x + _scale(h, masks.layer, masks.hidden)


class DecoderModel(nn.Module):
    """Holds `embed_tokens`, `layers` and `norm` under Hugging Face's `model.` prefix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A LLaMA-family causal language model; state-dict keys equal Hugging Face's.

    With tied embeddings there is no `lm_head` module: logits use `embed_tokens.weight`, so the
    tie cannot break (under pruning, sharding or loading).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args)
        self.lm_head = (
            None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, d) the output projection (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self, input_ids: torch.Tensor, masks: Masks | None = None, *, head: Callable | None = None
    ) -> Any:
        """Logits (B, T, V) for token ids (B, T); `masks` as in `sheared.model.masks`.

        `head(hidden (B, T, d), output_weight (V, d))` replaces the output projection, e.g. a fused
        loss that never materialises the logits; it runs inside `forward` so that data-parallel
        wrappers (DDP, FSDP2) see the output weight as they see every other parameter.
        """
        hidden = self.hidden_states(input_ids, masks)
        if head is not None:
            return head(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    def hidden_states(
        self, input_ids: torch.Tensor, masks: Masks | None = None, *, layer_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Final normed hidden states (B, T, d), before the output projection.

        `layer_dtype` (e.g. float64) runs every layer and the final norm on a temporary copy in that
        dtype, one at a time, so a high-precision pass holds one layer's converted weights at most.
        """
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        if layer_dtype is not None:
            x = x.to(layer_dtype)
        convert = (lambda m: copy.deepcopy(m).to(layer_dtype)) if layer_dtype is not None else (lambda m: m)
        cos, sin = rope_cos_sin(self.args, input_ids.shape[1], x.device, x.dtype)
        if masks is None:
            for layer in self.model.layers:
                x = convert(layer)(x, cos, sin)
            return convert(self.model.norm)(x)
        masks = masks.to(x.dtype)
        x = _scale(x, masks.hidden)
        kept = None if masks.hidden is None else torch.nonzero(masks.hidden).squeeze(-1)  # once per forward
        G, r = self.args.num_key_value_heads, self.args.heads_per_group
        for i, layer in enumerate(self.model.layers):
            x = convert(layer)(x, cos, sin, masks.for_layer(i, G, r, kept))
        return convert(self.model.norm)(x, masks.hidden, kept)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = INIT_STD) -> None:
        """Random init for models built from scratch: normal(0, std) matrices, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())
