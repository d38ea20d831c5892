"""What a report reads from a run directory (nothing is recomputed, nothing needs the model).

- `config.yaml`: a prune config has `pruning:` (target shape, method) and `source:`; a train config
  `model:`; `sheared.run_dir.run_kind` reads which kind of run it is;
- `metrics.jsonl`: one JSON object per step (keys in `sheared.run_dir`); a one-shot run logs one
  record, of step 0;
- `masks/masks.pt` (finished pruning runs): the exact-target binary masks and both shapes;
- `scores.pt` (one-shot runs and scored l0 inits): the score of every structure, and how it was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sheared.errors import UserError
from sheared.pruning.target import MASK_TYPES
from sheared.run_dir import (
    CONFIG_FILE,
    DOMAIN_WEIGHT,
    EVAL_LOSS,
    EXPECTED_SPARSITY,
    MASKS_DIR,
    MASKS_FILE,
    METRICS_FILE,
    SCORES_FILE,
    RunDir,
    RunKind,
    pruning_method,
    run_kind,
)

# The smoothed training-loss line is an exponential moving average over about this fraction of
# the run (TensorBoard-style, bias-corrected), so its lag looks the same for 200 or 50,000 steps.
SMOOTHING_FRACTION = 1 / 25


# --- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from one run directory."""

    run_dir: Path
    """The run directory."""
    records: list[dict[str, Any]]
    """metrics.jsonl, one dict per step, in order."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config.yaml ({} when missing)."""
    masks: dict[str, Any] | None = None
    """masks/masks.pt ({"masks", "log_alpha", "target", "source"}), None when not (yet) written."""
    scores: dict[str, Any] | None = None
    """scores.pt ({"scores", "source", "calibration", "fingerprint"}), None when the run has none."""
    notes: list[str] = field(default_factory=list)
    """Things found missing or odd while loading, repeated in summary.md."""

    @property
    def kind(self) -> RunKind:
        """`prune` (learned masks), `oneshot` or `train`: from config.yaml, else from the metrics (a
        pruning run logs sparsity; a one-shot one logs only step 0)."""
        if self.config:
            return run_kind(self.config)
        if not self.mask_names:
            return "train"
        return "oneshot" if all(r["step"] == 0 for r in self.records) else "prune"

    @property
    def pruning(self) -> bool:
        """A `sheared prune` run, learned or one-shot."""
        return self.kind != "train"

    @property
    def method(self) -> str | None:
        """`pruning.method` (`l0`, `activation`, `magnitude`, `random`); None for training or unknown."""
        return pruning_method(self.config)

    @property
    def domains(self) -> list[str]:
        """Domains in the order the run logs them."""
        return _suffixes(self.records, DOMAIN_WEIGHT, EVAL_LOSS)

    @property
    def mask_names(self) -> list[str]:
        """Mask types the run learns, in MASK_TYPES order."""
        names = _suffixes(self.records, EXPECTED_SPARSITY)
        order = {name: i for i, name in enumerate(MASK_TYPES)}
        return sorted(names, key=lambda n: order.get(n, len(order)))

    @property
    def has_lagrangian(self) -> bool:
        """Whether the loss logs a Lagrangian term (the projection controller's is always 0, so its
        total loss is the LM loss)."""
        for r in self.records:
            if r.get("lag_loss") is not None:
                if float(r["lag_loss"]) != 0.0:
                    return True
            elif r.get("loss") is not None and r.get("lm_loss") is not None and r["loss"] != r["lm_loss"]:
                return True  # older metrics without lag_loss
        return False

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        """Records of the evaluation steps."""
        return [r for r in self.records if any(k.startswith(EVAL_LOSS) for k in r)]


def _suffixes(records: list[dict[str, Any]], *prefixes: str) -> list[str]:
    """`x` of every key `prefix + x`, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            for prefix in prefixes:
                if key.startswith(prefix):
                    seen.setdefault(key[len(prefix) :], None)
    return list(seen)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (config, metrics, final masks, scores) into a RunData."""
    files = RunDir(run_dir)
    if not files.metrics.is_file():
        raise UserError(f"{files.path} has no {METRICS_FILE}; is it a run directory?")
    notes: list[str] = []
    records = files.read_metrics(notes)
    if not records:
        raise UserError(f"{files.metrics} has no records yet; run the report after the first step")
    config = files.read_config()
    if config is None:
        config = {}
        notes.append(f"{CONFIG_FILE} not found; the run type is inferred from the metrics")
    masks = _load_or_note(files.load_masks, f"{MASKS_DIR}/{MASKS_FILE}", notes)
    scores = _load_or_note(files.load_scores, SCORES_FILE, notes)
    return RunData(
        run_dir=files.path, records=records, config=config, masks=masks, scores=scores, notes=notes
    )


def _load_or_note(
    load: Callable[[], dict[str, Any] | None], name: str, notes: list[str]
) -> dict[str, Any] | None:
    """A torch file of the run, or None with a note when it cannot be read."""
    try:
        return load()
    except (RuntimeError, EOFError, OSError) as e:  # e.g. caught while the run writes it
        notes.append(f"{name} cannot be read ({type(e).__name__}); read as missing")
        return None


# --- small pure helpers --------------------------------------------------------------------------


def series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key`; "nan"/"inf" strings become floats."""
    pairs = [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def num_points(records: list[dict[str, Any]], key: str) -> int:
    """How many records log `key` (a value, not None)."""
    return sum(1 for r in records if r.get(key) is not None)


def smooth(values: np.ndarray, window: float) -> np.ndarray:
    """Bias-corrected exponential moving average over about `window` points; skips non-finite values.

    Args:
        values: (N,) float.
        window: the EMA's span; 1 returns the values unchanged.

    Returns:
        (N,) float; NaN until the first finite value.
    """
    decay = 1.0 - 1.0 / max(window, 1.0)
    out = np.full(len(values), np.nan)
    mean, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            mean = decay * mean + (1 - decay) * v
            weight = decay * weight + (1 - decay)
        if weight > 0:
            out[i] = mean / weight
    return out


def smoothing_window(num_points: int) -> float:
    return max(1.0, num_points * SMOOTHING_FRACTION)


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(records):
        if key in record and record[key] is not None:
            return float(record[key])
    return None


def fmt(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


# Units of parameter counts: (scale, suffix, digits shown).
COUNT_UNITS = ((1e9, "B", 2), (1e6, "M", 3), (1e3, "K", 1), (1.0, "", 0))


def unit(n: float) -> tuple[float, str, int]:
    return next(u for u in COUNT_UNITS if abs(n) >= u[0] or u[0] == 1.0)


def count(n: float) -> str:
    """A parameter count for people: 1.19 B, 2.370 M, 3.0 K."""
    scale, suffix, digits = unit(n)
    return f"{n / scale:.{digits}f} {suffix}".rstrip()


def target_num_params(masks: dict[str, Any] | None) -> float | None:
    """Parameters of the target shape (from masks.pt's source args and target), or None."""
    if masks is None:
        return None
    from sheared.model.args import ModelArgs, parameter_counts
    from sheared.pruning.target import TargetShape

    source = ModelArgs(**masks["source"])
    return float(parameter_counts(TargetShape(**masks["target"]).model_args(source))["num_params"])
