"""`sheared export`: a run (or one of its checkpoints) -> a verified standard Hugging Face checkpoint.

For a pruning run: exact-target deterministic masks, compaction (`sheared.pruning.compaction`), a
config of the source's own family with the target shape and an explicit `head_dim`. For a
continued-pretraining run: the trained weights as they are. Either way the directory is reloaded
with `AutoModelForCausalLM.from_pretrained` (no custom code, strict) and its logits are compared
with our model (masked, for a pruning run) on real sequences, in float64 and in float32, within a
tolerance made from the model's own measured float32 error, before success is reported; a model
whose logits are constant or not finite is refused (no comparison could verify it). The numbers go
into `export_report.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sheared.config import config_from_dict
from sheared.errors import UserError
from sheared.files import FAILED_SUFFIX as FAILED_SUFFIX  # re-exported: an export that failed verification
from sheared.files import atomic_write_json, atomic_write_text, disk_problem, failed_path, publish_dir
from sheared.model import CausalLM, Masks, Source, load_source, parameter_counts, save_hf
from sheared.model.args import SHAPE_FIELDS
from sheared.precision import torch_dtype
from sheared.pruning.compaction import kept_structure, slice_state_dict
from sheared.pruning.controller import TargetController
from sheared.pruning.params import expected_num_params
from sheared.run_dir import (
    CONFIG_FILE,
    TRAINER_STATE,
    RunDir,
    Trainable,
    checkpoint_run,
    load_masks,
    load_module_weights,
    read_final_state,
    write_run_state,
)
from sheared.train.config import PruneConfig, TrainConfig

REPORT_FILE = "export_report.json"
# How close the reload must be: measured, not guessed. The float32 reload and the masked model differ
# by float32 rounding at best, and how much that is depends on the model and the tokens (depth, the
# largest activations, sequence length): 3e-7 to 1e-5 in logits for the tiny random test models,
# 3e-5 to 2e-3 for SmolLM2-135M targets on real text. So the masked model is run in float32 and in
# float64 on the verification tokens, and the reload may differ from either by FLOAT32_ERROR_MULTIPLE
# times that measured float32 error, never less than FLOAT32_ERROR_FLOOR x max |logit| (a few float32
# ulps of the largest logit). Measured on 22 SmolLM2-135M exports (20 random-mask targets with
# float32 and bfloat16 weights on 2 x 64 and 2 x 256 tokens; a run after one pruning step and after
# one bf16 continued step), the reload's difference was 0.4 to 2.3 times the model's own error; a
# kept head swapped with a dropped one moves the logits by 1e5 to 1e6 times it (tests/export).
FLOAT32_ERROR_MULTIPLE = 8.0
FLOAT32_ERROR_FLOOR = 1e-6
FAR_FROM_TARGET = 0.05  # warn when a mask type's expected sparsity is further than this from its target
DTYPES = ("float32", "bfloat16")  # saved weight dtypes (`--dtype`); `precision.torch_dtype` maps them


class ExportVerificationError(RuntimeError):
    """The reloaded export does not compute what the model it came from computes."""


@dataclass
class RunCheckpoint:
    """A run directory, its config and the checkpoint to export."""

    run_dir: Path
    config: PruneConfig | TrainConfig
    checkpoint: Path | None
    """None for a one-shot pruning run (its masks and final state stand in for a checkpoint)."""


def resolve_run(path: str | Path) -> RunCheckpoint:
    """A run directory (its newest checkpoint) or one checkpoint folder of a run."""
    p = Path(path)
    files = checkpoint_run(p)
    if files is not None:
        checkpoint = p
    elif (files := RunDir(p)).is_run():
        checkpoint = files.newest_checkpoint()
        if checkpoint is None and not (files.kind() == "oneshot" and files.finished()):
            raise UserError(f"run {p} has no complete checkpoint yet; nothing to export")
    else:
        raise UserError(f"{p} is neither a run directory ({CONFIG_FILE}) nor a checkpoint ({TRAINER_STATE})")
    data = files.read_config()
    if data is None:
        raise UserError(f"checkpoint {p} lies in no run directory ({files.config} does not exist)")
    cls = TrainConfig if files.kind() == "train" else PruneConfig
    return RunCheckpoint(files.path, config_from_dict(cls, data), checkpoint)


def check_output_dir(out: Path, force: bool, source: Path, run_dir: Path) -> None:
    """Refuse an output that is, holds or lies in the source, or is or holds the run; refuse a
    non-empty output unless `force`, and even then anything but a previous export."""
    resolved = out.resolve()
    for p in (source.resolve(), run_dir.resolve()):
        if resolved == p or p.is_relative_to(resolved):
            raise UserError(f"--out {out} would overwrite {p}; choose a new folder")
    if source.is_dir() and resolved.is_relative_to(source.resolve()):
        raise UserError(f"--out {out} lies inside the source {source}; the source is never written")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(
                f"--out {out} is not empty; choose a new folder or pass --force to replace a previous export"
            )
        if not (out / REPORT_FILE).is_file():
            raise UserError(
                f"--out {out} is not empty and holds no previous export ({REPORT_FILE}); --force replaces only an export"
            )


def verification_ids(cfg: PruneConfig | TrainConfig, tokenizer: Any, num_sequences: int) -> torch.Tensor:
    """Real token sequences: held-out sequences of the run's data, else public-domain paragraphs."""
    from sheared.data.tokens import PreparedData

    try:
        data = PreparedData.open(cfg.data.path, verify="size")
        rows = [data.sequences(d, "eval", [0]) for d in data.domains][:num_sequences]
        return torch.cat(rows)[:, : min(data.seq_len, 256)]
    except UserError:
        from sheared.eval.texts import REAL_TEXTS

        return tokenizer(list(REAL_TEXTS), return_tensors="pt", truncation=True, max_length=64).input_ids


VOCAB_CHUNK = 8192  # output rows converted to float64 at a time by the reference logits


@torch.no_grad()
def reference_logits(model: CausalLM, masks: Masks | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of `model` under `masks` in float64, streamed: one layer's float64 copy and
    VOCAB_CHUNK rows of the output projection at a time, never a float64 copy of the whole model."""
    hidden = model.hidden_states(ids, masks, layer_dtype=torch.float64)  # (B, T, d)
    weight = model.output_weight
    return torch.cat(
        [
            F.linear(hidden, weight[i : i + VOCAB_CHUNK].double())
            for i in range(0, weight.shape[0], VOCAB_CHUNK)
        ],
        dim=-1,
    )


@torch.no_grad()
def reload_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    """Reload `out` with transformers in float32 (strict: no missing, unexpected or mismatched keys)
    and return its logits (B, T, V) on `ids`; only the exported model is held in memory."""
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        raise ExportVerificationError(f"strict reload of {out} failed: {problems}")
    return reloaded.eval()(ids).logits


def model_logit_check(expected: torch.Tensor, in_float32: torch.Tensor) -> dict[str, Any]:
    """What the model's own logits allow: its float32 error, the tolerance made from it, and a problem
    (one line) when its logits are not finite or constant, which no comparison could verify.

    Args:
        expected: the model's float64 logits (B, T, V) (`reference_logits`).
        in_float32: the same model's float32 logits (B, T, V).
    """
    finite = bool(torch.isfinite(expected).all() and torch.isfinite(in_float32).all())
    error = (in_float32.double() - expected).abs().max().item()
    largest = expected.abs().max().item()
    tolerance = max(FLOAT32_ERROR_MULTIPLE * error, FLOAT32_ERROR_FLOOR * largest)
    spread = (expected.amax(-1) - expected.amin(-1)).max().item()  # largest over positions
    tokens = " x ".join(map(str, expected.shape[:2]))
    problem = None
    if not finite:
        problem = (
            f"the model's logits are not finite (NaN or infinity) on the {tokens} verification tokens: its "
            "weights overflow; export an earlier checkpoint or train again with a lower lr"
        )
    elif not spread > tolerance:
        problem = (
            f"the model's logits are constant over the {tokens} verification tokens (they vary by at most "
            f"{spread:.3g} over the vocabulary, max |logit| {largest:.3g}): a dead model, e.g. trained with "
            "too high a learning rate; comparing its export with it would prove nothing"
        )
    return {
        "float32_error": error,
        "tolerance": tolerance,
        "tolerance_rule": f"max({FLOAT32_ERROR_MULTIPLE:g} x float32_error, {FLOAT32_ERROR_FLOOR:g} x max_abs_logit)",
        "max_abs_logit": largest,
        "logit_spread": spread,
        "problem": problem,
    }


def reload_problem(numbers: dict[str, Any]) -> str | None:
    """One line when the reload's logits differ from the model's (float64 or float32) by more than
    the tolerance; None when they agree. Written with `<=` so that NaN fails."""
    tolerance, error = numbers["tolerance"], numbers["float32_error"]
    for key, what in (("max_abs_logit_diff", "float64"), ("max_abs_logit_diff_float32", "float32")):
        if not numbers[key] <= tolerance:
            return (
                f"the reloaded export differs from the model by {numbers[key]:.3g} > {tolerance:.3g} in logits "
                f"(against its {what} logits; the model's own float32 error is {error:.3g})"
            )
    return None


def export_model(
    model: CausalLM,
    masks: Masks | None,
    out: Path,
    *,
    source: Source,
    ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, Any] | None = None,
    release_weights: bool = False,
) -> dict[str, Any]:
    """Compact (when `masks` are given), save as a HF directory, verify; returns the report.

    Args:
        model: our model holding the weights to export (rounded in place to `dtype`).
        masks: exact-target binary masks, or None to export `model` as it is.
        out: output directory (created; must be checked by the caller).
        source: the source (tokenizer and base config of the family).
        ids: real token ids (B, T) for the verification.
        dtype: dtype of the saved weights.
        extra_files: name -> JSON data written next to the weights.
        release_weights: free `model`'s weights (move it to the meta device) before the reload, so
            the peak is the source plus the target; `model` cannot be used afterwards.

    Raises:
        ExportVerificationError: the model's logits are not finite or constant (nothing saved), the
            reload is not strict, or its logits differ from the model's float64 or float32 ones by
            more than the tolerance (`model_logit_check`); `out/export_report.json` says by how much.
    """
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))  # the weights exactly as they will be saved
        expected = reference_logits(model, masks, ids)  # (B, T, V) float64, before the compacted copy exists
        in_float32 = model(ids, masks)  # (B, T, V): what the model computes in float32
    numbers = model_logit_check(expected, in_float32)
    report = {
        "verified": False,
        "max_abs_logit_diff": None,  # against the float64 logits
        "max_abs_logit_diff_float32": None,
        **numbers,
        "verification_tokens": list(ids.shape),
        "dtype": str(dtype).removeprefix("torch."),
        "verification_dtype": "the model in float64 and float32, the reload in float32",
        "source_shape": _shape(model.args),
        "source_num_params": parameter_counts(model.args)["num_params"],
    }
    if numbers["problem"] is not None:  # refused before anything is saved
        atomic_write_json(out / REPORT_FILE, report)
        raise ExportVerificationError(numbers["problem"])
    if masks is not None:
        kept = kept_structure(model.args, masks)
        target_args = kept.shape().model_args(model.args)
        with torch.device("meta"):
            small = CausalLM(target_args)  # takes the slices themselves: one copy of the target
        small.load_state_dict(
            slice_state_dict(model.state_dict(), model.args, kept), strict=True, assign=True
        )
    else:
        small = model
    save_hf(small, out, tokenizer=source.tokenizer, base_config=source.hf_config, dtype=dtype)
    report["exported_num_params"] = small.num_params()
    del small
    if release_weights:  # saved, and the model's logits computed: the reload is then the only model in memory
        model.to("meta")
    for name, content in (extra_files or {}).items():
        atomic_write_json(out / name, content)
    reloaded = reload_logits(out, ids)  # (B, T, V) float32
    report["max_abs_logit_diff"] = (reloaded.double() - expected).abs().max().item()
    report["max_abs_logit_diff_float32"] = (reloaded - in_float32).abs().max().item()
    exported = json.loads((out / "config.json").read_text())
    report["exported_shape"] = {k: exported[k] for k in _SHAPE_FIELDS}
    report["problem"] = reload_problem(report)
    report["verified"] = report["problem"] is None
    if not report["verified"]:
        atomic_write_json(out / REPORT_FILE, report)
        raise ExportVerificationError(report["problem"])
    return report


_SHAPE_FIELDS = ("model_type", *SHAPE_FIELDS)


def _shape(args) -> dict[str, Any]:
    return {"model_type": args.family, **{k: getattr(args, k) for k in _SHAPE_FIELDS[1:]}}


def _trained_weights_and_masks(
    run: RunCheckpoint, model: CausalLM
) -> tuple[Masks | None, dict[str, Any], dict]:
    """Load the run's weights into `model` (the source): its exact-target masks (pruning runs),
    its state (domains, weights, reference losses, step, tokens) and the masks' distance to the target."""
    cfg = run.config
    if run.checkpoint is None:  # one-shot: the source's own weights under the selected masks
        masks = Masks(**load_masks(run.run_dir)["masks"])
        return masks, read_final_state(run.run_dir), {}
    l0 = lagrangian = None
    if isinstance(cfg, PruneConfig):  # as the run built them, so that the checkpoint's keys match
        l0, lagrangian = TargetController.saved_modules(
            cfg.pruning.controller, model.args, cfg.pruning.target
        )
    saved = load_module_weights(run.checkpoint, Trainable(model, l0, lagrangian))
    state = {k: saved[k] for k in ("step", "tokens", "reference_losses")}
    state["domain_weights"] = dict(zip(saved["domains"], saved["sampler"]["weights"]))
    state["sampler"] = saved["sampler"]  # continued pretraining carries on the run's data stream
    if l0 is None:
        return None, state, {}
    with torch.no_grad():
        gap = {n: float(s.mean()) - l0.specs[n].target_sparsity for n, s in l0.expected_sparsity().items()}
    far = {n: g for n, g in gap.items() if abs(g) > FAR_FROM_TARGET}
    if far:
        listed = ", ".join(f"{n} {g:+.3f}" for n, g in far.items())
        print(
            f"warning: the masks are still far from the target (expected minus target sparsity: {listed}); "
            "the export keeps the exact target counts, but the model was not trained at that size",
            file=sys.stderr,
        )
    return l0.deterministic("target"), state, gap


def export_run(
    path: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    dtype: str = "float32",
    num_sequences: int = 4,
    gguf_type: str | None = None,
) -> dict[str, Any]:
    """Export a pruning or continued-pretraining run (or one checkpoint of it) to `out_dir`.

    The HF export (and, with `gguf_type`, its GGUF file `model-<type>.gguf`) is built and verified in
    `OUT.export-tmp/` and swapped in as one folder: at every moment `out_dir` holds the previous
    export, GGUF file included, or the complete new one.

    Raises:
        UserError: a mistake in the arguments, the run or `out_dir`, or no room on the disk (nothing
            replaced).
        ExportVerificationError: the export (or its GGUF file: GGUFVerificationError) failed
            verification; nothing replaced, the build kept as `OUT.unverified/`.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if gguf_type is not None:
        from sheared.export.gguf import check_gguf_type, check_run_for_gguf

        check_gguf_type(gguf_type)
        check_run_for_gguf(path)
    run = resolve_run(path)
    cfg = run.config
    pruning = isinstance(cfg, PruneConfig)
    out = Path(out_dir)
    source = load_source(cfg.source_spec)
    check_output_dir(out, force, source.path, run.run_dir)

    model = source.model
    masks, trainer_state, gap = _trained_weights_and_masks(run, model)
    _check_finite(model, run)
    run_state = {
        "domain_weights": trainer_state["domain_weights"],
        "reference_losses": trainer_state["reference_losses"],
        "source": str(source.path),
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "step": trainer_state["step"],
        "tokens": trainer_state["tokens"],
    }
    if "sampler" in trainer_state:
        run_state["sampler"] = trainer_state["sampler"]
    ids = verification_ids(cfg, source.tokenizer, num_sequences)
    needed = sum(p.numel() for p in model.parameters()) * torch_dtype(dtype).itemsize
    try:
        # built and verified in OUT.export-tmp/, then swapped in; a failed verification stays as OUT.unverified/
        with publish_dir(
            out, replace=True, suffix=STAGING_SUFFIX, keep_failed=(ExportVerificationError,)
        ) as staging:
            write_run_state(staging, run_state)  # `sheared train` of the export starts from it
            report = export_model(
                model,
                masks,
                staging,
                source=source,
                ids=ids,
                dtype=torch_dtype(dtype),
                release_weights=True,
            )
            report.update(
                {
                    "run_dir": str(run.run_dir),
                    "checkpoint": str(run.checkpoint) if run.checkpoint else None,
                    "step": trainer_state["step"],
                    "tokens_trained": trainer_state["tokens"],
                    "source": str(source.path),
                    "expected_minus_target_sparsity": gap,
                }
            )
            if masks is not None:
                binary = {n: getattr(masks, n) for n in masks.names()}
                report["masks_num_params"] = round(expected_num_params(model.args, binary).item())
            if gguf_type is not None:  # in the same folder, so that both are swapped in together
                report["gguf"] = _write_gguf(staging, out, gguf_type, ids, report)
            atomic_write_text(
                staging / "README.md", model_card(report, cfg, pruning, str(path), str(out_dir))
            )
            atomic_write_json(staging / REPORT_FILE, report)  # last: a folder without it is not an export
    except ExportVerificationError as e:
        from sheared.export.gguf import GGUFVerificationError

        if isinstance(e, GGUFVerificationError):  # its message names the file kept
            raise
        raise ExportVerificationError(f"{e}; see {failed_path(out) / REPORT_FILE}") from None
    except Exception as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        raise UserError(
            f"cannot write the export to {out.parent} ({problem}); it needs about {needed / 2**20:,.0f} MiB; "
            "nothing was replaced"
        ) from None
    return report


STAGING_SUFFIX = ".export-tmp"


def _write_gguf(
    staging: Path, out: Path, gguf_type: str, ids: torch.Tensor, report: dict[str, Any]
) -> dict[str, Any]:
    """Write and verify `model-<type>.gguf` in the export being built; its report entry, with the
    path the file will have once the folder is swapped in."""
    from sheared.export.gguf import GGUFVerificationError, export_gguf, gguf_path

    try:
        entry = export_gguf(staging, gguf_type, ids=ids)
    except GGUFVerificationError as e:  # the whole build is kept as OUT.unverified/
        kept = failed_path(out) / failed_path(gguf_path(out, gguf_type)).name
        report["gguf"] = {**e.report, "path": str(kept)}
        atomic_write_json(staging / REPORT_FILE, report)
        raise GGUFVerificationError(
            f"{kept} failed verification: {'; '.join(e.report['problems'])}", report["gguf"]
        ) from None
    return {**entry, "path": str(gguf_path(out, gguf_type))}


def _check_finite(model: CausalLM, run: RunCheckpoint) -> None:
    """Refuse weights with NaN or infinity (a diverged run) before anything is written."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(
                f"{run.checkpoint or run.run_dir} holds non-finite weights ({name} has NaN or infinity): the run "
                "diverged; export an earlier checkpoint (RUN/checkpoints/step_N) or train again with a lower lr"
            )


def model_card(report: dict[str, Any], cfg, pruning: bool, run_path: str, out_dir: str) -> str:
    """A short model card: what the model is, its shape and parameters, how it was made."""
    shape = report["exported_shape"]
    src = report["source_shape"]
    if not pruning:
        made = "continued pretraining"
    elif cfg.pruning.one_shot:
        made = f"one-shot structured pruning ({cfg.pruning.method} importance)"
    else:
        made = "pruning with learned structured masks (Sheared LLaMA)"
    lines = [
        f"# {Path(out_dir).name}",
        "",
        f"A `{shape['model_type']}` model made with `sheared` by {made}. It loads with "
        "`AutoModelForCausalLM.from_pretrained` and needs no custom code.",
        "",
        "| | source | this model |",
        "|---|---|---|",
    ]
    for key in _SHAPE_FIELDS[1:]:
        lines.append(f"| {key} | {src[key]} | {shape[key]} |")
    lines += [
        f"| parameters | {report['source_num_params']:,} | {report['exported_num_params']:,} |",
        "",
        f"- Source: `{report['source']}`",
        f"- Data: `{cfg.data.path}`, {report['tokens_trained']:,} tokens over {report['step']:,} steps",
        f"- Verified: reloaded with transformers, max |logit difference| {report['max_abs_logit_diff']:.2e} "
        f"(tolerance {report['tolerance']:g}) on {report['verification_tokens'][0]} real sequences",
        "",
        "Made by:",
        "",
        "```bash",
        f"sheared {'prune' if pruning else 'train'} --config CONFIG --run-dir {report['run_dir']}"
        f"   # resolved config: {RunDir(report['run_dir']).config}",
        f"sheared export {run_path} --out {out_dir}",
        "```",
        "",
    ]
    return "\n".join(lines)
