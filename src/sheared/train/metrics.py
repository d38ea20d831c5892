"""Watching a run: `metrics.jsonl` (one line per step, flushed), TensorBoard when installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sheared.files import guard_writes
from sheared.run_dir import RunDir, cut_metrics


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per step; only the main rank writes.

    Args:
        run_dir: the run directory.
        enabled: False on ranks other than 0.
        resume_step: when resuming, lines of later steps (written after the checkpoint by a
            run that then crashed) are dropped so the file has each step once; damaged lines are
            moved to metrics.damaged.jsonl, with a line on stderr (`cut_metrics`).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        files = RunDir(run_dir)
        self.path = files.metrics
        self._tb = None
        self.kept: list[dict[str, Any]] = []
        """The records of the steps before a resumed run's first (main rank)."""
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            self.kept, note = cut_metrics(files.path, resume_step)
            if note is not None:
                print(f"sheared: {note}", file=sys.stderr, flush=True)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")  # noqa: SIM115 (open for the whole run, closed by close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(files.tensorboard), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with guard_writes(self.path):  # a full disk: one line, the lines already written stay
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
