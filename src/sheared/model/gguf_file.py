"""Reading LLaMA-architecture GGUF files (llama.cpp's format) into Hugging Face names.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with the `gguf` package. llama.cpp
stores q and k rows in the interleaved rotary layout; they are permuted back to the
`rotate_half` layout of Hugging Face and our decoder.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sheared.errors import UserError
from sheared.model.args import ModelArgs

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face name; `{i}` is the layer index.
TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.")
# Per-dimension RoPE frequency divisors (D/2,) of llama3 RoPE scaling; not a weight of the decoder.
ROPE_FREQS_TENSOR = "rope_freqs.weight"


def _hf_name(gguf_name: str) -> str | None:
    match = _LAYER_PATTERN.match(gguf_name)
    if match is None:
        return TENSOR_NAMES.get(gguf_name)
    template = TENSOR_NAMES.get(_LAYER_PATTERN.sub("blk.{i}.", gguf_name))
    return None if template is None else template.format(i=match.group(1))


def _reader(path: Path):
    """The file's parsed header and memory-mapped tensors; parsing a vocabulary takes seconds, so the
    last two files are kept (keyed by size and modification time, so a rewritten file is re-read)."""
    try:
        stat = Path(path).stat()
    except OSError as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    return _cached_reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    import gguf  # deferred: only GGUF sources need it

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on non-GGUF files
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_metadata(path: Path) -> tuple[ModelArgs, dict[str, Any]]:
    """`ModelArgs` and a Hugging Face style base config (token ids, context) from a GGUF header."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF architecture {arch!r} in {path} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (convert other models to a Hugging Face directory)"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(
            f"{path} uses RoPE scaling ({scaling}), which is not read from GGUF files; "
            "load the model from its Hugging Face directory instead"
        )
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    args = ModelArgs(
        family="llama",
        vocab_size=int(_field(reader, f"{arch}.vocab_size", embedding.shape[-1])),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
    )
    base = {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "_name": _field(reader, "general.name", path.stem),
    }
    return args, {k: int(v) if k.endswith("_id") and v is not None else v for k, v in base.items()}


def _unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order, the inverse of `_unpermute_rotary`.

    Within each head, Hugging Face rotates row i with row i + D/2 (`rotate_half`); llama.cpp rotates
    adjacent rows 2i and 2i + 1, so row i goes to 2i and row i + D/2 to 2i + 1. w: (heads * D, cols).
    """
    rows, cols = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_gguf_state_dict(path: Path, args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a llama GGUF file, dequantized, under Hugging Face names, as `dtype`."""
    from gguf.quants import dequantize

    reader = _reader(path)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:  # RoPE scaling, checked by whoever knows the RoPE type
            continue
        name = _hf_name(tensor.name)
        if name is None:
            raise UserError(f"unexpected tensor {tensor.name!r} in {path}; is this a LLaMA GGUF file?")
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # GGUF lists dimensions fastest-first; torch wants them slowest-first.
        w = torch.from_numpy(values.reshape([int(n) for n in reversed(tensor.shape)]).copy())
        if name.endswith("q_proj.weight"):
            w = _unpermute_rotary(w, args.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rotary(w, args.num_key_value_heads)
        state[name] = w.to(dtype)
    return state
