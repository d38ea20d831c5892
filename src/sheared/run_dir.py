"""The run directory: the one place that knows its layout, its metric keys and its final masks.

A run of `sheared prune` or `sheared train` writes (docs/formats.md has the details):

    RUN_DIR/
      config.yaml           the resolved config (written once, when the run starts; never rewritten)
      config.resume-N.yaml  the resolved config of the N-th resumed attempt
      metrics.jsonl         one JSON object per step (keys below)
      tensorboard/          the same scalars for TensorBoard (when installed)
      checkpoints/step_N/   resumable checkpoints (`sheared.train.checkpoint` owns their inside)
      masks/masks.pt        pruning runs, at the end: exact-target binary masks, log_alpha, shapes
      masks/masks.json      ... and a readable summary of the kept structures
      scores.pt             one-shot scores of every structure (one-shot runs and scored l0 inits)
      final_state.json      one-shot runs: domains, weights, reference losses, tokens (no checkpoint)
      report/               `sheared report` output

Every other room (the loop, export, report, demo) asks this module for names and never spells a
file name of a run directory itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sheared.errors import UserError
from sheared.files import atomic_write, atomic_write_json

CONFIG_FILE = "config.yaml"
RESUME_CONFIG = "config.resume-{}.yaml"  # the resolved config of each resumed attempt
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
MASKS_DIR = "masks"
MASKS_FILE = "masks.pt"
MASKS_SUMMARY = "masks.json"
SCORES_FILE = "scores.pt"
TARGET_SEARCH_FILE = "target_search.json"  # budget targets: the ranked candidates and the chosen shape
# One-shot runs have no checkpoint: what export and continued pretraining need from the run
# (domains, weights, reference losses, tokens) is kept here instead.
FINAL_STATE_FILE = "final_state.json"
REPORT_DIR = "report"
# Written by `sheared export` next to a model: the run's domain weights and reference losses, so
# that continued pretraining of that model starts from them.
RUN_STATE_FILE = "sheared_run_state.json"

# Metric keys of metrics.jsonl. Scalars: step, tokens, loss (LM + Lagrangian), lm_loss (the data
# loss: CE, or (1 - α)·CE + α·τ²·KD when distilling), ce_loss and kd_loss (distilling), lag_loss, lr,
# grad_norm, tokens_per_s, expected_params. Per domain or per mask type, `PREFIX + name`:
EVAL_LOSS = "eval_loss/"
REFERENCE_LOSS = "reference_loss/"
EVAL_KL = "eval_kl/"  # KL(teacher ‖ model) per domain, at temperature 1, when distilling
DOMAIN_WEIGHT = "domain_weight/"
EXPECTED_SPARSITY = "expected_sparsity/"
TARGET_SPARSITY = "target_sparsity/"
LAMBDA1 = "lambda1/"
LAMBDA2 = "lambda2/"
LAG_LOSS = "lag_loss/"
TIMING_KEYS = ("tokens_per_s",)  # the only keys that differ between two runs of the same config


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def masks(self) -> Path:
        return self.path / MASKS_DIR / MASKS_FILE

    @property
    def masks_summary(self) -> Path:
        return self.path / MASKS_DIR / MASKS_SUMMARY

    @property
    def scores(self) -> Path:
        return self.path / SCORES_FILE

    @property
    def target_search(self) -> Path:
        return self.path / TARGET_SEARCH_FILE

    @property
    def final_state(self) -> Path:
        return self.path / FINAL_STATE_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR

    def is_run(self) -> bool:
        """Whether this folder was written by `sheared prune` or `sheared train` (has its config)."""
        return self.config.is_file()

    def holds_run(self) -> bool:
        """Whether a run already started here (a checkpoint, masks or a metrics line exists)."""
        has_checkpoint = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        return self.metrics.exists() or has_checkpoint or self.masks.exists()

    def check_fresh(self, resume: bool) -> None:
        """Refuse to start a new run over an existing one (unless resuming it)."""
        if resume or not self.holds_run():
            return
        has_checkpoint = self.checkpoints.is_dir() and any(
            p.is_dir() and not p.name.endswith(".tmp") for p in self.checkpoints.iterdir()
        )
        if has_checkpoint or self.masks.exists():
            raise UserError(
                f"run directory {self.path} already holds a run; pass --resume to continue it, "
                "or choose another --run-dir"
            )
        raise UserError(
            f"run directory {self.path} holds a run that stopped before its first checkpoint; pass --resume "
            "to start it again from step 0, or choose another --run-dir"
        )

    def next_resume_config(self) -> Path:
        """Where the resolved config of the next resumed attempt goes (config.yaml is never rewritten)."""
        n = 1
        while (self.path / RESUME_CONFIG.format(n)).exists():
            n += 1
        return self.path / RESUME_CONFIG.format(n)


def metric(prefix: str, name: str) -> str:
    """The metrics.jsonl key of a per-domain or per-mask value, e.g. `eval_loss/code`."""
    return prefix + name


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete records of a run's metrics.jsonl (a half-written last line is skipped)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the last line can be incomplete: metrics are appended and flushed per step
    return records


# --- final masks ---------------------------------------------------------------------------------


def save_final_masks(run_dir: str | Path, masks: dict[str, torch.Tensor], extra: dict[str, Any]) -> Path:
    """Write the final exact-target masks of a pruning run, atomically.

    Args:
        run_dir: the run directory.
        masks: mask name -> binary tensor (exact target counts).
        extra: what else `masks.pt` holds: `log_alpha` (name -> tensor), `target` and `source`
            (the shapes as dicts), and `summary` (the readable `masks.json` content).

    Returns:
        The masks folder.
    """
    files = RunDir(run_dir)
    tensors = {name: t.detach().cpu() for name, t in masks.items()}
    content = {
        "masks": tensors,
        "log_alpha": {k: v.detach().cpu() for k, v in extra.get("log_alpha", {}).items()},
        "target": extra["target"],
        "source": extra["source"],
    }
    atomic_write(files.masks, lambda f: torch.save(content, f), binary=True)
    atomic_write_json(files.masks_summary, extra["summary"], indent=1)
    return files.masks.parent


def load_masks(run_dir: str | Path) -> dict[str, Any] | None:
    """masks.pt of a finished pruning run ({"masks", "log_alpha", "target", "source"}), or None."""
    path = RunDir(run_dir).masks
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the run state kept next to an export --------------------------------------------------------


def write_run_state(model_dir: str | Path, state: dict[str, Any]) -> Path:
    """Keep a run's final domain weights and reference losses next to the model it exported."""
    return atomic_write_json(Path(model_dir) / RUN_STATE_FILE, state)


def read_run_state(model_path: str | Path) -> dict[str, Any]:
    """The state `write_run_state` kept next to a model, or {} (any other model)."""
    path = Path(model_path) / RUN_STATE_FILE
    return json.loads(path.read_text()) if Path(model_path).is_dir() and path.is_file() else {}


def write_final_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """The end state of a run without checkpoints (one-shot pruning)."""
    return atomic_write_json(RunDir(run_dir).final_state, state)


def read_final_state(run_dir: str | Path) -> dict[str, Any] | None:
    """`write_final_state`'s content, or None."""
    path = RunDir(run_dir).final_state
    return json.loads(path.read_text()) if path.is_file() else None
