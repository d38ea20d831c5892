"""`export_gguf`: write a GGUF file from a Hugging Face directory under a temporary name, verify it,
then rename it into place (`DIR/model-<type>.gguf`); and the file's place in a `sheared export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sheared.errors import UserError
from sheared.export.export import REPORT_FILE
from sheared.export.gguf.layout import DEFAULT_GGUF_TYPE, check_gguf_args, check_gguf_type
from sheared.export.gguf.verify import GGUFVerificationError, verify_gguf
from sheared.export.gguf.vocabulary import gguf_vocab
from sheared.export.gguf.writer import write_gguf
from sheared.files import FAILED_SUFFIX as FAILED_SUFFIX  # re-exported: a GGUF file that failed verification
from sheared.files import atomic_write_json, failed_path, publish_dir

# About how many bytes a weight takes in each GGUF type (q8_0: 32 int8 weights and one f16 scale per block).
GGUF_BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "q8_0": 34 / 32}


def gguf_path(export_dir: str | Path, gguf_type: str) -> Path:
    """Where `sheared export --gguf` writes the GGUF file of an export: `DIR/model-<type>.gguf`."""
    return Path(export_dir) / f"model-{gguf_type}.gguf"


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
    needed = sum(p.numel() for p in source.model.parameters()) * GGUF_BYTES_PER_WEIGHT[gguf_type]
    with publish_dir(
        final, replace=force, mkdir=False, keep_failed=(GGUFVerificationError,), needed=round(needed)
    ) as tmp:
        written = write_gguf(source.model, source.tokenizer, source.hf_config, tmp, gguf_type)
        result = verify_gguf(tmp, model_dir, source.model, ids, gguf_type)
        entry = {"path": str(final), "type": gguf_type, "bytes": tmp.stat().st_size, **written, **result}
        if not result["verified"]:
            failed = failed_path(final)
            entry["path"] = str(failed)
            raise GGUFVerificationError(
                f"{failed} failed verification: {'; '.join(result['problems'])}", entry
            )
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
