"""`sheared export`: what the command does with its arguments, apart from parsing them.

A run (or one of its checkpoints) becomes a verified HF export in `--out` (`export_run`), with a
GGUF file added to it when `--gguf` / `--gguf-type` asks for one; a finished export given as the
run gets only its GGUF file (`add_gguf_to_export`). User mistakes raise `UserError`; a failed
verification prints one line and returns 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sheared.errors import UserError
from sheared.export.export import ExportVerificationError, export_run
from sheared.export.gguf import (
    add_gguf_to_export,
    check_run_for_gguf,
    gguf_summary,
    is_export_dir,
    requested_gguf_type,
    run_verification_ids,
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
        The exit code: 0 when everything was written and verified, 1 when a verification failed
        (the line printed to stderr says which).

    Raises:
        UserError: a mistake in the arguments, the run or the output folder (nothing written).
    """
    gguf_type = requested_gguf_type(gguf, gguf_type)  # checked before anything is written
    if gguf_type is not None and is_export_dir(run):  # a finished export: add its GGUF file
        if out is not None and Path(out).resolve() != Path(run).resolve():
            raise UserError(f"{run} is an export and its GGUF file is written into it; drop --out {out}")
        export_dir, ids = run, None
    else:
        if out is None:
            raise UserError("--out is required: the new folder the export is written to")
        if gguf_type is not None:
            check_run_for_gguf(run)
        try:
            report = export_run(run, out, force=force, dtype=dtype)
        except ExportVerificationError as e:
            print(f"sheared: export failed verification: {e}", file=sys.stderr)
            return 1
        shape = report["exported_shape"]
        print(
            f"exported {shape['model_type']}: {describe(shape, detail=True)}; "
            f"{report['exported_num_params']:,} parameters"
        )
        print(
            f"verified: strict reload with transformers, max |logit diff| {report['max_abs_logit_diff']:.2e} "
            f"(tolerance {report['tolerance']:g}); report in {out}/export_report.json"
        )
        if gguf_type is None:
            return 0
        export_dir, ids = out, run_verification_ids(run, out)  # the ids the HF export was verified on
    try:
        report = add_gguf_to_export(export_dir, gguf_type, ids=ids, force=force)
    except ExportVerificationError as e:
        print(
            f"sheared: GGUF export failed verification (the HF export in {export_dir} is fine): {e}",
            file=sys.stderr,
        )
        return 1
    print("\n".join(gguf_summary(report["gguf"])))
    return 0
