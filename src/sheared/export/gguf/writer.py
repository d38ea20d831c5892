"""Writing a GGUF file: the `general.*` / `llama.*` header, the vocabulary, and every weight encoded
as f32, f16 or q8_0 (`encode`; `rounded` is what a file of a type gives back)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sheared.export.gguf.layout import gguf_tensors, rope_freq_factors, tensor_type
from sheared.export.gguf.vocabulary import gguf_vocab, special_token_ids, write_vocab
from sheared.model import CausalLM, ModelArgs
from sheared.model.gguf_file import ROPE_FREQS_TENSOR

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def encode(w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight as stored: (rows, cols) float32/float16 values or Q8_0 blocks; 1-D tensors float32."""
    values = w.detach().to(torch.float32).numpy()
    qtype = tensor_type(values.shape, gguf_type)
    return gguf.quants.quantize(values, qtype), qtype


def rounded(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """`w` (rows, cols) as a GGUF file of `gguf_type` stores it, dequantized back to float32.

    Rounding works along rows (Q8_0 blocks hold 32 consecutive values of one row), so it commutes with
    llama.cpp's q/k row permutation: the rounded HF weight is what our reader must give back exactly.
    """
    values, qtype = encode(w, gguf_type)
    dequantized = gguf.quants.dequantize(values, qtype).reshape(tuple(w.shape))
    return torch.from_numpy(np.ascontiguousarray(dequantized, dtype=np.float32))


def _write_metadata(writer: gguf.GGUFWriter, args: ModelArgs, name: str, gguf_type: str) -> None:
    """The `general.*` and `llama.*` keys llama.cpp reads to build the model."""
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    # head_dim need not be hidden_size / heads after pruning; llama.cpp would assume that without these.
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    if args.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(args.rope_scaling["factor"])


def write_gguf(model: CausalLM, tokenizer: Any, config: Any, path: Path, gguf_type: str) -> dict[str, Any]:
    """Write `model` (HF names, rotate_half q/k) as a llama.cpp GGUF file at `path`.

    Args:
        model: our decoder holding the weights (llama or mistral without sliding window).
        tokenizer: its byte-level BPE tokenizer (a transformers tokenizer).
        config: its Hugging Face config (token ids).
        path: the file to write (fsynced).
        gguf_type: `f32`, `f16` or `q8_0`.

    Returns:
        What was written: `tensor_types` (count per stored type) and `tokenizer_pre`.
    """
    args = model.args
    ids = special_token_ids(config, tokenizer)
    vocab = gguf_vocab(tokenizer, args.vocab_size, ids["bos"], ids["eos"])
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, args, path.parent.name, gguf_type)
    write_vocab(writer, vocab, ids, getattr(tokenizer, "chat_template", None))
    counts: dict[str, int] = {}
    if args.rope_type == "llama3":
        writer.add_tensor(ROPE_FREQS_TENSOR, rope_freq_factors(args).numpy())
        counts["f32"] = 1
    for gguf_name, w in gguf_tensors(model):
        values, qtype = encode(w, gguf_type)
        writer.add_tensor(gguf_name, values, raw_dtype=qtype if values.dtype == np.uint8 else None)
        counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:  # a failed write (a full disk) closes too, so that the removed file's space is freed
        with contextlib.suppress(Exception):
            writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    if vocab.pre is None:
        print(
            "warning: the tokenizer's pre-tokenizer has no llama.cpp name; llama.cpp will split text with its "
            "default rules, which may tokenize some texts differently (the weights are not affected)",
            file=sys.stderr,
        )
    return {"tensor_types": counts, "tokenizer_pre": vocab.pre}
