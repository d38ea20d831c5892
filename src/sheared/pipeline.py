"""The stages `sheared demo` and `sheared study` share: typed run configs built from a template with
`dataclasses.replace`, and prune → export → continue → export, each stage skipped when its output
is already complete (so both can be re-run or resumed cheaply).

Configs travel between stages as typed values, never as override strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from sheared.model.args import describe
from sheared.pruning.target import TargetShape
from sheared.run_dir import RunDir
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.deadline import Deadline
from sheared.train.loop import RunResult

RunConfig = TypeVar("RunConfig", PruneConfig, TrainConfig)


# --- typed config builders ---------------------------------------------------------------------------


def with_loop(cfg: RunConfig, **fields: Any) -> RunConfig:
    """`cfg` with these `train.*` fields (steps, global_batch_size, seed, ...)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))


def with_data(cfg: RunConfig, path: str | None = None, **fields: Any) -> RunConfig:
    """`cfg` reading prepared data at `path` (never preparing it) and with these `data.*` fields."""
    if path is not None:
        fields.update(path=str(path), auto_prepare=None)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **fields))


def with_pruning(cfg: PruneConfig, **fields: Any) -> PruneConfig:
    """`cfg` with these `pruning.*` fields (target, method, init, ...)."""
    return dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, **fields))


def with_target(cfg: PruneConfig, target: TargetShape) -> PruneConfig:
    return with_pruning(cfg, target=target)


def with_distill(cfg: RunConfig, teacher: str = "source", **fields: Any) -> RunConfig:
    """`cfg` distilling from `teacher` (alpha, temperature, top_k as given, else the config's)."""
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=teacher, **fields))


def with_lr(cfg: RunConfig, lr: float) -> RunConfig:
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))


def with_steps(cfg: RunConfig, steps: int, evaluations: int, checkpoints: int = 1) -> RunConfig:
    """`steps` steps with `evaluations` held-out evaluations (the last at the end) and `checkpoints`
    checkpoints (the last at the end)."""
    return with_loop(
        cfg,
        steps=steps,
        eval_interval=max(1, math.ceil(steps / evaluations)),
        save_interval=max(1, math.ceil(steps / checkpoints)),
    )


# --- stages ---------------------------------------------------------------------------------------


def run_stage(
    cfg: PruneConfig | TrainConfig, run_dir: Path, *, progress: bool = True, deadline: Deadline | None = None
) -> RunResult | None:
    """Run `cfg` into `run_dir`, or finish it; a finished run is kept as it is. Returns what ran
    (None when it was finished before)."""
    from sheared.train.loop import run

    files = RunDir(run_dir)
    if files.finished(cfg.train.steps):
        print(f"  done before: {run_dir}")
        return None
    # a run that stopped before its first checkpoint starts again, its files moved aside to
    # RUN.replaced-N/; an unfinished one-shot run (no checkpoints) is done again in place
    one_shot = isinstance(cfg, PruneConfig) and cfg.pruning.one_shot
    started = files.is_run() or files.holds_run()
    restart = not one_shot and started and files.newest_checkpoint() is None
    return run(
        cfg,
        run_dir,
        resume=files.path.exists() and not restart,
        restart=restart,
        progress=progress,
        deadline=deadline,
    )


def export_stage(run_dir: Path, out: Path) -> dict[str, Any]:
    """Export `run_dir` to `out` unless a verified export of it is there; the export report.

    Raises:
        UserError: the export failed verification (one line; `out` is left as it was).
    """
    from sheared.errors import UserError
    from sheared.export import REPORT_FILE, ExportVerificationError, export_run

    report_file = Path(out) / REPORT_FILE
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if report.get("verified"):
            print(f"  done before: {out}")
            return report
    try:
        report = export_run(run_dir, out, force=Path(out).exists())
    except ExportVerificationError as e:
        raise UserError(f"the export of {run_dir} failed verification: {e}") from None
    print(
        f"  {out}: {describe(report['exported_shape'])}, {report['exported_num_params']:,} "
        f"parameters; reloaded with transformers, max |logit diff| {report['max_abs_logit_diff']:.1e}"
    )
    return report


def prune_and_export(cfg: PruneConfig, run_dir: Path, out: Path) -> Path:
    """Prune (learned or one-shot) into `run_dir`, export the exact-target model to `out`."""
    run_stage(cfg, run_dir)
    export_stage(run_dir, out)
    return out


def continue_and_export(cfg: TrainConfig, run_dir: Path, out: Path) -> Path:
    """Continue pretraining `cfg.model` into `run_dir`, export the result to `out`."""
    run_stage(cfg, run_dir)
    export_stage(run_dir, out)
    return out


def exported_before(run_dir: Path, out: Path) -> bool:
    """Whether `out` holds a verified export of `run_dir`."""
    from sheared.export import REPORT_FILE

    report_file = Path(out) / REPORT_FILE
    if not report_file.is_file():
        return False
    report = json.loads(report_file.read_text())
    return bool(report.get("verified")) and report.get("run_dir") == str(run_dir)
