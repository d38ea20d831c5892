"""Where each weight goes in a llama.cpp GGUF file and at which type: the tensor names, the q/k row
permutation to llama.cpp's rotary order, tied embeddings (no `output.weight`), the llama3 RoPE
factors tensor, and the `--gguf-type` of the 2-D weights (1-D tensors stay float32)."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import torch

from sheared.errors import UserError
from sheared.model import CausalLM, ModelArgs
from sheared.model.gguf_file import TENSOR_NAMES, permute_rotary

Q = gguf.GGMLQuantizationType
# --gguf-type -> the tensor type of the 2-D weights (1-D tensors stay float32, as llama.cpp's converter keeps them).
GGUF_TYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
DEFAULT_GGUF_TYPE = "f16"  # llama.cpp's converter writes f16 by default too
GGUF_FAMILIES = ("llama", "mistral")  # the families that are llama.cpp's `llama` architecture


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def requested_gguf_type(gguf: bool, gguf_type: str | None) -> str | None:
    """The GGUF type of `--gguf` / `--gguf-type` (which implies `--gguf`), checked; None for no GGUF."""
    if not gguf and gguf_type is None:
        return None
    gguf_type = DEFAULT_GGUF_TYPE if gguf_type is None else gguf_type
    check_gguf_type(gguf_type)
    return gguf_type


def check_gguf_args(args: ModelArgs, where: str) -> None:
    """Refuse what llama.cpp's `llama` architecture does not compute (biases, q/k norms, sliding windows)."""
    if args.family not in GGUF_FAMILIES or args.attention_bias or args.qk_norm:
        raise UserError(
            f"GGUF export of {where} is not supported: family {args.family!r} is not llama.cpp's llama "
            f"architecture (q/k/v biases or q/k norms); supported families: {', '.join(GGUF_FAMILIES)}"
        )
    if args.sliding_window is not None:
        raise UserError(
            f"GGUF export of {where} is not supported: sliding_window={args.sliding_window} "
            "(llama.cpp's llama architecture attends to the whole context); supported: sliding_window null"
        )


def rope_freq_factors(args: ModelArgs) -> torch.Tensor:
    """(D/2,) float32 divisors of the plain RoPE frequencies that give `args`' llama3-scaled ones.

    llama.cpp applies llama3 RoPE scaling through a `rope_freqs.weight` tensor of these factors; they
    come from our decoder's own frequencies, so the file rotates exactly as our model does.
    """
    from sheared.model.decoder import inv_frequencies

    return inv_frequencies(args.replace(rope_type="default", rope_scaling={})) / inv_frequencies(args)


# GGUF tensors whose rows llama.cpp keeps in its rotary order -> the `ModelArgs` field counting their heads.
ROTARY_ROWS = {"blk.{i}.attn_q.weight": "num_attention_heads", "blk.{i}.attn_k.weight": "num_key_value_heads"}


def gguf_tensor_names(args: ModelArgs) -> list[tuple[str, str, int | None]]:
    """(GGUF name, HF name, heads to permute q/k rows by or None) of every weight, from the
    `gguf_file.TENSOR_NAMES` table; no `output.weight` when the embeddings are tied."""
    names = []
    for gguf_name, hf_name in TENSOR_NAMES.items():
        heads = getattr(args, ROTARY_ROWS[gguf_name]) if gguf_name in ROTARY_ROWS else None
        if "{i}" in gguf_name:
            names += [
                (gguf_name.format(i=i), hf_name.format(i=i), heads) for i in range(args.num_hidden_layers)
            ]
        elif not (gguf_name == "output.weight" and args.tie_word_embeddings):
            names.append((gguf_name, hf_name, heads))
    return names


def gguf_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, weight in llama.cpp's layout) of every weight of `model` (HF names, rotate_half
    q/k): q/k rows permuted to llama.cpp's rotary order, no `output.weight` when tied."""
    state = model.state_dict()
    for gguf_name, hf_name, heads in gguf_tensor_names(model.args):
        yield gguf_name, state[hf_name] if heads is None else permute_rotary(state[hf_name], heads)


def tensor_type(shape: tuple[int, ...], gguf_type: str) -> gguf.GGMLQuantizationType:
    """The type a tensor of `shape` is stored at: 2-D weights at `gguf_type`, 1-D tensors float32.

    Q8_0 rows must be whole 32-value blocks; a weight whose rows are not is stored as f16, as
    llama.cpp's converter does.
    """
    qtype = GGUF_TYPES[gguf_type] if len(shape) == 2 else Q.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return qtype
