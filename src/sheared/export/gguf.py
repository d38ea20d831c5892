"""`sheared export --gguf`: a verified GGUF file (llama.cpp's format) beside a verified HF export.

The GGUF file is written from the Hugging Face export itself (`DIR/model-<type>.gguf`, see
`gguf_path`), so it holds exactly the weights that were verified there. It is written under a
temporary name, read back and checked, and only then renamed into place:

- exactness: our GGUF reader (`sheared.model.gguf_file`: dequantized tensors, q/k rows
  un-permuted, the header as `ModelArgs`) must give back the HF weights exactly as rounded to the
  type, and transformers' GGUF loader (`from_pretrained(DIR, gguf_file=...)`) must compute what
  transformers computes with those rounded weights; its tokenizer, built from the GGUF vocabulary,
  must encode like the export's;
- quality: the GGUF model's logits and mean next-token loss against the unrounded HF model, on
  real token ids, within the type's `TOLERANCES` (f32: max |Δlogit| <= 1e-4; f16 and q8_0: a bound
  that follows the logits' scale, and the loss within 0.1% / 1%).

The file follows llama.cpp's conventions for the `llama` architecture: q/k rows in its interleaved
rotary order, no `output.weight` when the embeddings are tied (llama.cpp then reuses
`token_embd.weight`), 1-D tensors (norms, RoPE factors) in float32, and a byte-level BPE
vocabulary (`tokenizer.ggml.model = gpt2`) with its merges.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sheared.errors import UserError
from sheared.export.export import REPORT_FILE, ExportVerificationError
from sheared.files import FAILED_SUFFIX as FAILED_SUFFIX  # re-exported: a GGUF file that failed verification
from sheared.files import atomic_write_json, failed_path, publish_dir
from sheared.model import CausalLM, ModelArgs
from sheared.model.gguf_file import (
    ROPE_FREQS_TENSOR,
    TENSOR_NAMES,
    permute_rotary,
    read_gguf_metadata,
    read_gguf_state_dict,
)

Q = gguf.GGMLQuantizationType
# --gguf-type -> the tensor type of the 2-D weights (1-D tensors stay float32, as llama.cpp's converter keeps them).
GGUF_TYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
DEFAULT_GGUF_TYPE = "f16"  # llama.cpp's converter writes f16 by default too
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
GGUF_FAMILIES = ("llama", "mistral")  # the families that are llama.cpp's `llama` architecture


@dataclasses.dataclass(frozen=True)
class GGUFTolerance:
    """How far the GGUF model may be from the HF model it was written from, on the verification ids."""

    logit_atol: float
    """Allowed max |GGUF logit - HF logit|: `logit_atol + logit_rtol * max |HF logit|`."""
    logit_rtol: float
    """The part of the allowed logit difference that grows with the logits' scale."""
    loss_rel_diff: float
    """Largest allowed |GGUF loss - HF loss| / HF loss, mean next-token loss."""

    def allowed_logit_diff(self, max_abs_logit: float) -> float:
        return self.logit_atol + self.logit_rtol * max_abs_logit


# The quality bar of each type: the GGUF model against the unrounded HF model. f32 stores the HF
# weights exactly (1e-4 is the HF export's own bound, SPEC §6; it matches to the last bit). f16 rounds
# each weight to 11 significant bits, q8_0 to 8 bits per block of 32 with one f16 scale; their logit
# bounds follow the logits' scale and the loss bound is the quality bar. Measured on SmolLM2-135M
# (2 x 64 real tokens, logits up to 30.3): f16 max |Δlogit| 0.032 (0.11% of 30.3), loss +0.004%;
# q8_0 1.25 (4.1%), loss +0.11%, the same top-1 token at 97.7% of positions. The layout itself (names,
# q/k permutation, shapes) is checked exactly, apart from rounding: see `verify_gguf`.
TOLERANCES: dict[str, GGUFTolerance] = {
    "f32": GGUFTolerance(logit_atol=1e-4, logit_rtol=0.0, loss_rel_diff=1e-6),
    "f16": GGUFTolerance(logit_atol=0.0, logit_rtol=1e-2, loss_rel_diff=1e-3),
    "q8_0": GGUFTolerance(logit_atol=0.0, logit_rtol=0.15, loss_rel_diff=1e-2),
}
# transformers' GGUF model against transformers running the HF directory with the same rounded
# weights: the same code on the same numbers (measured: 0.0), so float32 noise at most.
EXACT_ATOL = 1e-4

# A tokenizer.json pre-tokenizer, reduced by `_pre_tokenizer_signature`, -> llama.cpp's name for the
# same text splitting (`tokenizer.ggml.pre`). llama.cpp splits text before byte-level BPE with
# built-in regexes chosen by that name; without one it falls back to its `default` splitting.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM/SmolLM2: single digits, then GPT-2's
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3.x
}


class GGUFVerificationError(ExportVerificationError):
    """The GGUF file read back does not hold or compute what the HF export does."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report
        """The report entry of the failed file (its numbers and problems)."""


def gguf_path(export_dir: str | Path, gguf_type: str) -> Path:
    """Where `sheared export --gguf` writes the GGUF file of an export: `DIR/model-<type>.gguf`."""
    return Path(export_dir) / f"model-{gguf_type}.gguf"


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


# --- vocabulary ------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFVocab:
    """A byte-level BPE vocabulary in GGUF terms (`tokenizer.ggml.*`)."""

    tokens: list[str]
    """Token text per id (byte-level alphabet, e.g. `Ġthe`), padded to the model's vocab size."""
    token_types: list[int]
    """`gguf.TokenType` per id: NORMAL, CONTROL (special added), USER_DEFINED (other added), UNUSED (padding)."""
    merges: list[str]
    """BPE merges in priority order, `left right`."""
    pre: str | None
    """llama.cpp's pre-tokenizer name, or None when the tokenizer's splitting has no llama.cpp name."""
    add_bos: bool
    """Whether the tokenizer puts BOS in front of every text."""
    add_eos: bool
    """Whether the tokenizer puts EOS after every text."""


def _parts(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return (
        list(spec.get("pretokenizers") or spec.get("decoders") or [])
        if spec["type"] == "Sequence"
        else [spec]
    )


def _pre_tokenizer_signature(spec: dict) -> tuple:
    """The parts of a tokenizer.json pre-tokenizer that decide how text is split, as a hashable tuple."""
    signature: list[tuple] = [("normalizer", spec["normalizer"]["type"])] if spec.get("normalizer") else []
    for part in _parts(spec.get("pre_tokenizer")):
        kind = part["type"]
        if kind == "ByteLevel" and part.get("add_prefix_space"):
            signature.append(("ByteLevel", part.get("use_regex", True), "add_prefix_space"))
        elif kind == "ByteLevel":
            signature.append(("ByteLevel", part.get("use_regex", True)))
        elif kind == "Digits":
            signature.append(("Digits", bool(part.get("individual_digits"))))
        elif kind == "Split":
            pattern = part["pattern"]
            signature.append(("Split", pattern.get("Regex", pattern.get("String"))))
        else:
            signature.append((kind,))
    return tuple(signature)


def gguf_vocab(tokenizer: Any, vocab_size: int, bos_id: int | None, eos_id: int | None) -> GGUFVocab:
    """The GGUF vocabulary of a byte-level BPE tokenizer (SmolLM/SmolLM2, Llama 3, GPT-2 style).

    Ids the tokenizer does not use (an embedding padded beyond the vocabulary) become `[PAD<id>]`
    tokens of type UNUSED, so every embedding row has a token.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    kinds = {p["type"] for p in _parts(spec.get("pre_tokenizer")) + _parts(spec.get("decoder"))}
    if model["type"] != "BPE" or "ByteLevel" not in kinds:
        raise UserError(
            f"GGUF export supports byte-level BPE tokenizers (SmolLM/SmolLM2, Llama 3); this one is a "
            f"{model['type']} model with {', '.join(sorted(kinds)) or 'no'} pre-tokenizer/decoder parts"
        )
    text_of = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    text_of.update({i: t["content"] for i, t in added.items()})
    if max(text_of) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(text_of)} but the model only {vocab_size} embeddings"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in text_of:
            tokens.append(text_of[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        pre=PRE_TOKENIZERS.get(_pre_tokenizer_signature(spec)),
        add_bos=bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id],
        add_eos=eos_id is not None and with_special[-1:] == [eos_id] and plain[-1:] != [eos_id],
    )


# --- writing ---------------------------------------------------------------------------------------


def _first_id(value: Any) -> int | None:
    """A token id from a config entry that may be a list (e.g. Llama 3.1's several EOS ids)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _special_ids(config: Any, tokenizer: Any) -> dict[str, int | None]:
    """BOS/EOS/padding/unknown ids: the model config's, else the tokenizer's."""
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        value = _first_id(getattr(config, f"{key}_token_id", None))
        ids[key] = value if value is not None else _first_id(getattr(tokenizer, f"{key}_token_id", None))
    return ids


def rope_freq_factors(args: ModelArgs) -> torch.Tensor:
    """(D/2,) float32 divisors of the plain RoPE frequencies that give `args`' llama3-scaled ones.

    llama.cpp applies llama3 RoPE scaling through a `rope_freqs.weight` tensor of these factors; they
    come from our decoder's own frequencies, so the file rotates exactly as our model does.
    """
    from sheared.model.decoder import inv_frequencies

    return inv_frequencies(args.replace(rope_type="default", rope_scaling={})) / inv_frequencies(args)


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


def _write_vocab(
    writer: gguf.GGUFWriter, vocab: GGUFVocab, ids: dict[str, int | None], template: Any
) -> None:
    writer.add_tokenizer_model("gpt2")
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, value in ids.items():
        if value is not None:
            setters[key](value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


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


def _encode(w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight as stored: (rows, cols) float32/float16 values or Q8_0 blocks; 1-D tensors float32."""
    values = w.detach().to(torch.float32).numpy()
    qtype = GGUF_TYPES[gguf_type] if values.ndim == 2 else Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.shape[-1] % block:  # Q8_0 rows must be whole 32-value blocks; llama.cpp's converter uses f16
        qtype = Q.F16
    return gguf.quants.quantize(values, qtype), qtype


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
    ids = _special_ids(config, tokenizer)
    vocab = gguf_vocab(tokenizer, args.vocab_size, ids["bos"], ids["eos"])
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, args, path.parent.name, gguf_type)
    _write_vocab(writer, vocab, ids, getattr(tokenizer, "chat_template", None))
    counts: dict[str, int] = {}
    if args.rope_type == "llama3":
        writer.add_tensor(ROPE_FREQS_TENSOR, rope_freq_factors(args).numpy())
        counts["f32"] = 1
    state = model.state_dict()
    for gguf_name, hf_name, heads in gguf_tensor_names(args):
        w = state[hf_name] if heads is None else permute_rotary(state[hf_name], heads)
        values, qtype = _encode(w, gguf_type)
        writer.add_tensor(gguf_name, values, raw_dtype=qtype if values.dtype == np.uint8 else None)
        counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
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


# --- verification ----------------------------------------------------------------------------------


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy in float64."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()
    ).item()


def _compare(
    logits: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor, tolerance: GGUFTolerance
) -> dict:
    """How `logits` (B, T, V) differ from `reference`, and whether that is within `tolerance`."""
    loss, ref_loss = _loss(logits, ids), _loss(reference, ids)
    numbers = {
        "max_abs_logit_diff": (logits - reference).abs().max().item(),
        "allowed_logit_diff": tolerance.allowed_logit_diff(reference.abs().max().item()),
        "loss": loss,
        "loss_rel_diff": abs(loss - ref_loss) / ref_loss,
        "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).double().mean().item(),
    }
    # written as `<=` so that NaN fails
    ok = numbers["max_abs_logit_diff"] <= numbers["allowed_logit_diff"]
    return {"ok": bool(ok and numbers["loss_rel_diff"] <= tolerance.loss_rel_diff), **numbers}


def _describe(numbers: dict[str, float]) -> str:
    return (
        f"max |logit diff| {numbers['max_abs_logit_diff']:.3g} (allowed {numbers['allowed_logit_diff']:.3g}), "
        f"relative loss change {numbers['loss_rel_diff']:.3g}"
    )


def _header_mismatches(path: Path, args: ModelArgs) -> list[str]:
    """Fields of the GGUF header (read by our reader) that differ from `args`."""
    read, _ = read_gguf_metadata(path)
    problems = []
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        if getattr(read, key) != getattr(args, key):
            problems.append(f"{key} {getattr(read, key)} != {getattr(args, key)}")
    for key in ("rms_norm_eps", "rope_theta"):  # stored as float32
        if not math.isclose(getattr(read, key), getattr(args, key), rel_tol=1e-6):
            problems.append(f"{key} {getattr(read, key)} != {getattr(args, key)}")
    return problems


def _rope_mismatches(path: Path, args: ModelArgs) -> list[str]:
    """RoPE scaling keys and tensor (our reader refuses scaled RoPE in sources, so they are checked here)."""
    reader = gguf.GGUFReader(str(path))
    kind = reader.fields.get("llama.rope.scaling.type")
    factor = reader.fields.get("llama.rope.scaling.factor")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS_TENSOR), None)
    problems = []
    if args.rope_type == "linear" and (
        kind is None or kind.contents() != "linear" or factor is None
        or not math.isclose(factor.contents(), args.rope_scaling["factor"], rel_tol=1e-6)
    ):  # fmt: skip
        problems.append("rope.scaling.type/factor do not say linear scaling by the config's factor")
    if args.rope_type == "llama3" and (
        freqs is None or not np.array_equal(np.asarray(freqs.data), rope_freq_factors(args).numpy())
    ):
        problems.append(f"{ROPE_FREQS_TENSOR} is missing or differs from the llama3 factors")
    return problems


def rounded(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """`w` (rows, cols) as a GGUF file of `gguf_type` stores it, dequantized back to float32.

    Rounding works along rows (Q8_0 blocks hold 32 consecutive values of one row), so it commutes with
    llama.cpp's q/k row permutation: the rounded HF weight is what our reader must give back exactly.
    """
    values, qtype = _encode(w, gguf_type)
    dequantized = gguf.quants.dequantize(values, qtype).reshape(tuple(w.shape))
    return torch.from_numpy(np.ascontiguousarray(dequantized, dtype=np.float32))


def _weight_mismatches(read: dict[str, torch.Tensor], model: CausalLM, gguf_type: str) -> list[str]:
    """HF names of the tensors our reader gave back that are not exactly the rounded HF weights."""
    state = model.state_dict()
    names = sorted(set(read) | set(state))
    return [
        n
        for n in names
        if n not in read or n not in state or not torch.equal(read[n], rounded(state[n], gguf_type))
    ]


@torch.no_grad()
def verify_gguf(
    path: Path, model_dir: Path, model: CausalLM, ids: torch.Tensor, gguf_type: str
) -> dict[str, Any]:
    """Read the GGUF file back and check it against the HF model it was written from, on `ids` (B, T).

    Exactness (the file's layout: names, q/k permutation, shapes, header): our reader must give back
    the HF weights exactly as rounded to `gguf_type` (`rounded`), and transformers' GGUF loader must
    compute what transformers computes with those rounded weights (within `EXACT_ATOL`). Quality
    (what the rounding costs): the logits and mean next-token loss of the GGUF model against the
    unrounded HF model, within the type's `TOLERANCES`. Everything runs in float32.

    Args:
        path: the GGUF file.
        model_dir: the HF directory it was written from.
        model: our decoder holding that directory's weights.
        ids: real token ids (B, T).
        gguf_type: `f32`, `f16` or `q8_0`.

    Returns:
        The report entry: the numbers, the tolerance, `verified` and the `problems` found.
    """
    args, tolerance = model.args, TOLERANCES[gguf_type]
    if args.rope_type == "default":  # our reader also refuses a file with RoPE scaling keys or factors
        try:
            problems = _header_mismatches(path, args)
        except UserError as e:
            problems = [f"our GGUF reader refuses the header: {e}"]
    else:  # scaling that our reader refuses in a source: checked here instead
        problems = _rope_mismatches(path, args)
    expected = model.eval()(ids)  # (B, T, V)
    read = read_gguf_state_dict(path, args, torch.float32)
    wrong = _weight_mismatches(read, model, gguf_type)
    if wrong:
        problems.append(
            f"our GGUF reader gives back other weights than the rounded HF ones: {', '.join(wrong[:5])}"
        )
    with torch.device("meta"):
        read_back = CausalLM(args)
    read_back.load_state_dict(read, strict=True, assign=True)
    ours = _compare(read_back.eval()(ids), expected, ids, tolerance)
    del read, read_back
    if not ours.pop("ok"):
        problems.append(f"our GGUF reader: {_describe(ours)}")
    if args.rope_type == "default":
        theirs = _transformers_loader(path, model_dir, ids, gguf_type, tolerance)
        if not theirs["ok"]:
            problems.append(
                f"transformers' GGUF loader: {_describe(theirs)}; against the rounded HF weights "
                f"{theirs['max_abs_logit_diff_vs_rounded']:.3g} (allowed {EXACT_ATOL:g})"
            )
    else:  # its llama GGUF config reads no RoPE scaling: its model would rotate differently
        theirs = {
            "ok": None,
            "skipped": f"{args.rope_type} RoPE scaling is not read by transformers' GGUF loader",
        }
    return {
        "weights_exact": not wrong,
        **ours,
        "hf_loss": _loss(expected, ids),
        "verification_tokens": list(ids.shape),
        "verification_dtype": "float32",
        "tolerance": {**dataclasses.asdict(tolerance), "exact_atol": EXACT_ATOL},
        "transformers_loader": theirs,
        "verified": not problems,
        "problems": problems,
    }


def _transformers_loader(
    path: Path, model_dir: Path, ids: torch.Tensor, gguf_type: str, tolerance: GGUFTolerance
) -> dict[str, Any]:
    """transformers' GGUF loader against transformers running the HF directory, its weights unrounded
    (quality) and rounded to `gguf_type` (exactness); and its tokenizer against the export's."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_logits = reference(ids).logits  # (B, T, V)
    for p in reference.parameters():  # tied weights are one parameter
        p.copy_(rounded(p, gguf_type))
    rounded_logits = reference(ids).logits
    del reference
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=str(path), dtype=torch.float32).eval()
    logits = loaded(ids).logits
    del loaded
    numbers = _compare(logits, hf_logits, ids, tolerance)
    exact = (logits - rounded_logits).abs().max().item()
    numbers["ok"] = bool(numbers["ok"] and exact <= EXACT_ATOL)
    numbers["max_abs_logit_diff_vs_rounded"] = exact
    numbers["tokenizer_matches"] = _tokenizer_matches(model_dir, path)
    if not numbers["tokenizer_matches"]:
        print(
            f"warning: transformers' tokenizer read from {path.name} splits the check texts differently from "
            "the export's tokenizer (the weights are verified)",
            file=sys.stderr,
        )
    return numbers


def _tokenizer_matches(model_dir: Path, path: Path) -> bool:
    """Whether transformers' tokenizer built from the GGUF vocabulary encodes `REAL_TEXTS` (and a chat
    line) to the same ids as the export's own tokenizer."""
    from transformers import AutoTokenizer

    from sheared.eval.texts import REAL_TEXTS

    texts = [*REAL_TEXTS, "<|im_start|>user\n1234 + 56 = 1290?<|im_end|>\n"]
    ours = AutoTokenizer.from_pretrained(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir, gguf_file=str(path))
    return all(ours(t).input_ids == theirs(t).input_ids for t in texts)


# --- the export ------------------------------------------------------------------------------------


def default_verification_ids(tokenizer: Any) -> torch.Tensor:
    """Public-domain paragraphs (`sheared.eval.texts.REAL_TEXTS`) as (2, 64) token ids."""
    from sheared.eval.texts import REAL_TEXTS

    return tokenizer(list(REAL_TEXTS), return_tensors="pt", truncation=True, max_length=64).input_ids


def export_gguf(
    model_dir: str | Path,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    *,
    ids: torch.Tensor | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write `model_dir/model-<type>.gguf` from the HF directory, verify it, then rename it into place.

    Args:
        model_dir: a Hugging Face directory of a llama/mistral model with a byte-level BPE tokenizer.
        gguf_type: `f32`, `f16` or `q8_0`.
        ids: real token ids (B, T) to compare logits on; default `default_verification_ids`.
        force: replace an existing GGUF file of this type.

    Returns:
        The report entry: path, type, bytes, the numbers against the HF model and transformers' loader.

    Raises:
        GGUFVerificationError: the file read back differs; it is kept as `model-<type>.gguf.unverified`.
    """
    from sheared.model import load_source

    check_gguf_type(gguf_type)
    model_dir = Path(model_dir)
    final = gguf_path(model_dir, gguf_type)
    if final.exists() and not force:
        raise UserError(f"{final} exists; pass --force to replace it")
    source = load_source(model_dir)
    check_gguf_args(source.args, str(model_dir))
    if source.tokenizer is None:
        raise UserError(
            f"{model_dir} has no tokenizer files; a GGUF file carries the vocabulary, so it needs one"
        )
    ids = (default_verification_ids(source.tokenizer) if ids is None else ids).long()
    # written as model-<type>.gguf.tmp, read back, then renamed; a file that fails stays as .unverified
    with publish_dir(final, replace=force, mkdir=False, keep_failed=(GGUFVerificationError,)) as tmp:
        written = write_gguf(source.model, source.tokenizer, source.hf_config, tmp, gguf_type)
        result = verify_gguf(tmp, model_dir, source.model, ids, gguf_type)
        entry = {"path": str(final), "type": gguf_type, "bytes": tmp.stat().st_size, **written, **result}
        if not result["verified"]:
            failed = failed_path(final)
            entry["path"] = str(failed)
            raise GGUFVerificationError(f"{failed} failed verification: {'; '.join(result['problems'])}", entry)
    return entry


def is_export_dir(path: str | Path) -> bool:
    """Whether `path` is a finished `sheared export` (a HF directory with its export report)."""
    p = Path(path)
    return (p / REPORT_FILE).is_file() and (p / "config.json").is_file()


def add_gguf_to_export(
    export_dir: str | Path,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    *,
    ids: torch.Tensor | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """`export_gguf` into a finished export, then record the entry under "gguf" in its export report."""
    export_dir = Path(export_dir)
    report_file = export_dir / REPORT_FILE
    report = json.loads(report_file.read_text())
    entry = export_gguf(export_dir, gguf_type, ids=ids, force=force)
    report["gguf"] = entry
    atomic_write_json(report_file, report)
    return report


def check_run_for_gguf(run_path: str | Path) -> None:
    """Refuse, before anything is written, a run whose source llama.cpp cannot run as `llama`."""
    from sheared.export.export import resolve_run
    from sheared.model import load_tokenizer, read_source_config

    spec = resolve_run(run_path).config.source_spec
    args, _, _ = read_source_config(spec)
    check_gguf_args(args, str(spec))
    gguf_vocab(load_tokenizer(spec), args.vocab_size, None, None)


def run_verification_ids(run_path: str | Path, export_dir: str | Path) -> torch.Tensor:
    """The ids the HF export of a run was verified on (its held-out data, else `REAL_TEXTS`)."""
    from sheared.export.export import resolve_run, verification_ids
    from sheared.model import load_tokenizer

    return verification_ids(resolve_run(run_path).config, load_tokenizer(export_dir), 4)


def gguf_summary(entry: dict[str, Any]) -> list[str]:
    """Two lines for the terminal: the file, and how it was verified."""
    theirs = entry["transformers_loader"]
    if theirs["ok"]:
        loader = f"; transformers' GGUF loader {theirs['max_abs_logit_diff']:.2e}"
    else:
        loader = f"; transformers' GGUF loader skipped: {theirs['skipped']}"
    return [
        f"gguf: {entry['path']} ({entry['type']}, {entry['bytes'] / 2**20:,.1f} MiB)",
        f"verified: read back, max |logit diff| {entry['max_abs_logit_diff']:.2e} (allowed "
        f"{entry['allowed_logit_diff']:.2e}), relative loss change {entry['loss_rel_diff']:.2e} (allowed "
        f"{entry['tolerance']['loss_rel_diff']:g}){loader}",
    ]
