"""A wall-clock deadline for a training run.

When the speed measured so far says the remaining steps (with their evaluations and checkpoints)
will not be over by the deadline, the run is shortened: its last step moves earlier, and the
learning-rate schedule's decay is compressed to end there, so the model it ends with is annealed
rather than cut off in the middle of its schedule. A run is only ever shortened, never extended.

`make demo` gives its continued-pretraining runs the time its budget leaves them; the logic is
here, free of the loop, so that a test can drive it with simulated step times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """What the loop measured: seconds of its recent steps, of an evaluation, of a checkpoint."""

    steps: list[float] = field(default_factory=list)
    evaluation: float = 0.0
    checkpoint: float = 0.0
    RECENT = 3
    """Steps the speed is judged by: few, so that a machine that slows down is noticed soon."""

    def step(self) -> float:
        """Seconds a step takes now: the median of the last `RECENT` steps (0 before any)."""
        return statistics.median(self.steps[-self.RECENT :]) if self.steps else 0.0


@dataclass
class Deadline:
    """The moment (a value of `clock`) by which the run must be over, its last checkpoint written."""

    at: float
    clock: Callable[[], float] = time.monotonic
    reserve: Callable[[StepTimes], float] | None = None
    """Seconds to keep free before `at` for what follows the run, from the speed it measured so far."""

    def left(self, times: StepTimes | None = None) -> float:
        reserved = self.reserve(times) if self.reserve is not None and times is not None else 0.0
        return self.at - self.clock() - reserved

    def last_step(
        self,
        done: int,
        last: int,
        times: StepTimes,
        is_eval_step: Callable[[int], bool],
        is_save_step: Callable[[int], bool],
    ) -> int:
        """The last step a run that has done `done` steps (1-based) can reach in time: `last` when the
        rest fits, else the latest step whose steps, evaluations and checkpoints (one always after
        the last step) end by the deadline; `done` when not even one more step fits.
        """
        left = self.left(times)
        if self._seconds(done, last, times, is_eval_step, is_save_step) <= left:
            return last
        lo, hi = done, last  # the rest up to `lo` fits (or lo == done); up to `hi` it does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._seconds(done, mid, times, is_eval_step, is_save_step) <= left:
                lo = mid
            else:
                hi = mid
        return lo

    @staticmethod
    def _seconds(done: int, end: int, times: StepTimes, is_eval_step, is_save_step) -> float:
        """Seconds from after step `done` to the end of step `end` ended there (final evaluation and
        checkpoint included). Counted step by step: at most a few hundred steps in a demo."""
        if end <= done:
            return times.checkpoint
        evals = sum(1 for s in range(done + 1, end) if is_eval_step(s)) + 1
        saves = sum(1 for s in range(done + 1, end) if is_save_step(s)) + 1
        return (end - done) * times.step() + evals * times.evaluation + saves * times.checkpoint
