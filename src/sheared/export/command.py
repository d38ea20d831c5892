"""`sheared export`: what the command does with its arguments, apart from parsing them.

A run (or one of its checkpoints) becomes a verified HF export in `--out` (`export_run`), with a
GGUF file built in the same folder when `--gguf` / `--gguf-type` asks for one (both are swapped in
together); a finished export given as the run gets only its GGUF file (`add_gguf_to_export`). User
mistakes and failed verifications raise `UserError`: one line, exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from sheared.errors import UserError
from sheared.export.export import FLOAT32_ERROR_MULTIPLE, ExportVerificationError, export_run
from sheared.export.gguf import (
    GGUFVerificationError,
    add_gguf_to_export,
    gguf_summary,
    is_export_dir,
    requested_gguf_type,
)
from sheared.model.args import describe


def export_command(
    run: str,
    out: str | None,
    *,
    force: bool = False,
    dtype: str = "float32",
    gguf: bool = False,
    gguf_type: str | None = None,
) -> int:
    """Run `sheared export RUN [--out OUT] [--force] [--dtype D] [--gguf] [--gguf-type T]`.

    Args:
        run: a run directory (its newest checkpoint), one checkpoint folder, or (with a GGUF type) a
            finished export, which then gets its GGUF file.
        out: the new folder of the HF export; None (or `run` itself) for a finished export.
        force: replace a previous export in `out` (or the export's GGUF file of that type).
        dtype: dtype of the saved weights: float32 or bfloat16.
        gguf: also write a GGUF file (of `gguf_type`, default f16).
        gguf_type: f32, f16 or q8_0; implies `gguf`.

    Returns:
        The exit code: 0 when everything was written and verified.

    Raises:
        UserError: a mistake in the arguments, the run or the output folder, or a failed verification
            (one line saying which; nothing replaced).
    """
    gguf_type = requested_gguf_type(gguf, gguf_type)  # checked before anything is written
    if gguf_type is not None and is_export_dir(run):  # a finished export: add its GGUF file
        if out is not None and Path(out).resolve() != Path(run).resolve():
            raise UserError(f"{run} is an export and its GGUF file is written into it; drop --out {out}")
        try:
            report = add_gguf_to_export(run, gguf_type, force=force)
        except ExportVerificationError as e:
            raise UserError(
                f"GGUF export failed verification (the HF export in {run} is unchanged): {e}"
            ) from None
        print("\n".join(gguf_summary(report["gguf"])))
        return 0
    if out is None:
        raise UserError("--out is required: the new folder the export is written to")
    try:
        report = export_run(run, out, force=force, dtype=dtype, gguf_type=gguf_type)
    except ExportVerificationError as e:
        what = "GGUF export" if isinstance(e, GGUFVerificationError) else "export"
        raise UserError(f"{what} failed verification, nothing was replaced: {e}") from None
    shape = report["exported_shape"]
    print(
        f"exported {shape['model_type']}: {describe(shape, detail=True)}; "
        f"{report['exported_num_params']:,} parameters"
    )
    print(
        f"verified: strict reload with transformers, max |logit diff| {report['max_abs_logit_diff']:.2e} "
        f"against the model in float64 and {report['max_abs_logit_diff_float32']:.2e} in float32 (tolerance "
        f"{report['tolerance']:.2e}: {FLOAT32_ERROR_MULTIPLE:g} x the model's float32 error "
        f"{report['float32_error']:.2e}); report in {out}/export_report.json"
    )
    if "gguf" in report:
        print("\n".join(gguf_summary(report["gguf"])))
    return 0
