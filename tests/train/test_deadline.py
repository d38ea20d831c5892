"""A deadline shortens a continued-pretraining run: the last step moves earlier, the decay is
compressed to end there, the run counts as finished and resumes as the shortened run."""

from __future__ import annotations

import pytest

from sheared.config import load_config
from sheared.run_dir import RunDir, read_metrics
from sheared.train.config import TrainConfig
from sheared.train.deadline import Deadline, StepTimes
from sheared.train.loop import run
from sheared.train.optim import lr_multiplier


def _every(n):
    return lambda step: step % n == 0


def test_a_run_that_fits_keeps_its_steps():
    times = StepTimes(steps=[1.0, 1.0, 1.0], evaluation=5.0, checkpoint=2.0)
    # 10 more steps + evaluations at 15, 20 and the end + checkpoints at 20 and the end = 10 + 15 + 4
    deadline = Deadline(at=29.0, clock=lambda: 0.0)
    assert deadline.last_step(10, 20, times, _every(5), _every(10)) == 20


def test_a_slow_run_ends_at_the_latest_step_that_fits():
    times = StepTimes(steps=[1.0, 1.0, 2.0, 2.0, 2.0], evaluation=5.0, checkpoint=2.0)  # slowed down 2x
    deadline = Deadline(at=29.0, clock=lambda: 0.0)
    last = deadline.last_step(10, 20, times, _every(5), _every(10))
    # to step 16: 6 steps x 2 s + evaluations at 15 and 16 (the end) + one checkpoint = 12 + 10 + 2 = 24;
    # to step 17: 14 + 10 + 2 = 26; 18: 28; 19: 30 > 29
    assert last == 18
    assert Deadline._seconds(10, last, times, _every(5), _every(10)) <= 29.0
    assert Deadline._seconds(10, last + 1, times, _every(5), _every(10)) > 29.0


def test_past_the_deadline_the_run_ends_now():
    times = StepTimes(steps=[1.0], evaluation=5.0, checkpoint=2.0)
    assert Deadline(at=3.0, clock=lambda: 0.0).last_step(4, 20, times, _every(5), _every(10)) == 4


def test_the_speed_is_judged_by_the_last_steps():
    times = StepTimes(steps=[1.0] * 10 + [3.0, 3.0, 3.0])
    assert times.step() == 3.0


def test_the_compressed_schedule_keeps_its_warm_up_and_ends_at_the_minimum():
    full = [lr_multiplier(s, 100, 0.1, 0.1) for s in range(100)]
    short = [lr_multiplier(s, 40, 0.1, 0.1, planned_steps=100) for s in range(40)]
    assert short[:10] == full[:10]  # the warm-up of the planned run, unchanged
    assert short[39] == pytest.approx(0.1) and full[39] > 0.75
    assert lr_multiplier(5, 20, 0.1, 0.1, planned_steps=20) == lr_multiplier(5, 20, 0.1, 0.1)


class FixedDeadline(Deadline):
    """Says "end at step `end`" once `done` reaches `at_step` (speed-independent, for the test)."""

    def __init__(self, at_step: int, end: int):
        super().__init__(at=0.0)
        self.at_step, self.end, self.asked = at_step, end, []

    def last_step(self, done, last, times, is_eval_step, is_save_step):
        self.asked.append(done)
        assert times.steps and len(times.steps) == done - self.asked[0] + 1
        return min(last, self.end) if done >= self.at_step else last


def _config(tiny_export, data, *overrides):
    return load_config(
        TrainConfig,
        "configs/tiny/train.yaml",
        [f"model={tiny_export}", f"data.path={data}", "data.max_eval_sequences=2", *overrides],
    )


def test_a_deadline_shortens_the_run_and_it_stays_short(tiny_export, tiny_assets, tmp_path, capsys):
    steps = ["train.steps=12", "train.eval_interval=4", "train.save_interval=4", "optim.warmup_fraction=0.25"]
    cfg = _config(tiny_export, tiny_assets / "prepared", *steps)
    with pytest.raises(ValueError, match="continued-pretraining runs only"):
        from sheared.train.config import PruneConfig

        run(load_config(PruneConfig, "configs/tiny/prune.yaml"), tmp_path / "p", deadline=Deadline(at=0.0))
    result = run(cfg, tmp_path / "run", progress=False, deadline=FixedDeadline(at_step=3, end=6))
    assert result.steps == 6
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "last_step" not in records[1] and records[2]["last_step"] == 6
    assert "ends at step 6 of 12" in capsys.readouterr().out
    lr, min_ratio = cfg.optim.lr, cfg.optim.min_lr_ratio
    # the warm-up of 3 steps is kept; the decay then ends at the minimum at step 6 instead of 12
    assert records[2]["lr"] == pytest.approx(lr)
    assert records[5]["lr"] == pytest.approx(lr * min_ratio)
    assert "eval_loss/code" in records[5]  # the new last step evaluates and saves
    files = RunDir(tmp_path / "run")
    assert files.newest_checkpoint().name.endswith("6")
    assert files.read_final_state() == {"last_step": 6, "planned_steps": 12, "ended": "deadline"}
    assert files.finished(12)
    again = run(cfg, tmp_path / "run", resume=True, progress=False)  # finished: nothing runs
    assert again.steps == 6 and len(read_metrics(tmp_path / "run")) == 6
    from sheared.report import write_report

    write_report(tmp_path / "run")
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "6 of 12 planned: a deadline moved the last step to 6" in summary


def test_a_run_resumed_after_shortening_keeps_its_compressed_schedule(tiny_export, tiny_assets, tmp_path):
    steps = ["train.steps=8", "train.eval_interval=4", "train.save_interval=2"]
    cfg = _config(tiny_export, tiny_assets / "prepared", *steps)
    run(cfg, tmp_path / "full", progress=False, deadline=FixedDeadline(at_step=2, end=5))
    shortened = read_metrics(tmp_path / "full")

    class Stop(RuntimeError):
        pass

    class StopAt4(FixedDeadline):
        def last_step(self, done, last, times, is_eval_step, is_save_step):
            if done == 4:
                raise Stop  # after the checkpoint of step 2 (which knows the run ends at 5)
            return super().last_step(done, last, times, is_eval_step, is_save_step)

    with pytest.raises(Stop):
        run(cfg, tmp_path / "resumed", progress=False, deadline=StopAt4(at_step=2, end=5))
    run(cfg, tmp_path / "resumed", resume=True, progress=False)  # no deadline now: the schedule stays
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 6))
    assert [r["lr"] for r in resumed] == [r["lr"] for r in shortened]
    assert RunDir(tmp_path / "resumed").finished(8)
