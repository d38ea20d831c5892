"""Verifying a GGUF file: read it back (our reader and transformers' GGUF loader), check its header
and weights, and compare its logits and loss with the HF model it was written from."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sheared.errors import UserError
from sheared.export.export import ExportVerificationError
from sheared.export.gguf.layout import rope_freq_factors
from sheared.export.gguf.writer import rounded
from sheared.model import CausalLM, ModelArgs
from sheared.model.args import SHAPE_FIELDS
from sheared.model.gguf_file import ROPE_FREQS_TENSOR, read_gguf_metadata, read_gguf_state_dict


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


class GGUFVerificationError(ExportVerificationError):
    """The GGUF file read back does not hold or compute what the HF export does."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report
        """The report entry of the failed file (its numbers and problems)."""


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
    for key in (*SHAPE_FIELDS, "max_position_embeddings"):
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

    # transformers joins `gguf_file` to the folder for the config: a relative path would be joined twice
    model_dir, path = model_dir.resolve(), path.resolve()
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
    model_dir, path = model_dir.resolve(), path.resolve()  # as in `_transformers_loader`
    ours = AutoTokenizer.from_pretrained(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir, gguf_file=str(path))
    return all(ours(t).input_ids == theirs(t).input_ids for t in texts)
