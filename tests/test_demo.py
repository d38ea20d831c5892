"""The demo's plan fits its time budget, is kept for re-runs, and its summary compares every model."""

from __future__ import annotations

import json
import time

import pytest

from sheared import demo
from sheared.config import load_config
from sheared.train.config import TrainConfig


def _train_cfg():
    return load_config(TrainConfig, "configs/smollm2-135m/train.yaml", ["model=unused"])


def test_plan_sizes_steps_to_the_budget(tmp_path, monkeypatch, capsys):
    seconds = {"continued": 1.5, "continued-plain": 1.0}  # seconds per step, as measured by the probes
    monkeypatch.setattr(
        demo, "_probe_seconds_per_step", lambda cfg, run_dir, steps: seconds[run_dir.name[6:]]
    )
    cfg = demo.DemoConfig(time_budget_minutes=20, reserve_minutes=3.5)
    started = time.perf_counter() - 6.5 * 60  # 6.5 minutes already spent on the corpus, data and pruning
    plan = demo.make_plan(
        cfg, tmp_path, {"continued": _train_cfg(), "continued-plain": _train_cfg()}, started
    )
    left = (20 - 6.5 - 3.5) * 60
    assert plan["steps"] == pytest.approx(left / 2.5, abs=1.5)  # both runs fit what is left
    assert plan["tokens"] == plan["steps"] * 4 * 256
    assert "plan:" in capsys.readouterr().out
    monkeypatch.setattr(demo, "_probe_seconds_per_step", lambda *a: pytest.fail("probed again"))
    again = demo.make_plan(cfg, tmp_path, {"continued": _train_cfg()}, time.perf_counter())
    assert again == json.loads((tmp_path / "plan.json").read_text()) == plan  # kept for re-runs


def test_plan_is_capped_on_fast_machines(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_probe_seconds_per_step", lambda *a: 0.01)
    cfg = demo.DemoConfig(max_train_steps=400)
    plan = demo.make_plan(cfg, tmp_path, {"continued": _train_cfg()}, time.perf_counter())
    assert plan["steps"] == 400


def test_summary_table_compares_every_model_with_the_source():
    results = {
        "models": {"smollm2-135m": "smollm2-135m", "pruned": "p", "pruned-continued": "c"},
        "labels": {"smollm2-135m": "source", "pruned": "pruned", "pruned-continued": "continued"},
        "domains": {
            "smollm2-135m": {"a": {"perplexity": 10.0}, "b": {"perplexity": 30.0}},
            "pruned": {"a": {"perplexity": 100.0}, "b": {"perplexity": 300.0}},
            "pruned-continued": {"a": {"perplexity": 20.0}, "b": {"perplexity": 60.0}},
        },
    }
    table = demo.summary_table(results)
    assert "source" in table.splitlines()[0] and "continued" in table.splitlines()[0]
    assert table.splitlines()[-1].split() == ["vs", "source", "1.00x", "10.00x", "2.00x"]


def test_run_stage_keeps_a_finished_run_and_runs_an_unfinished_one(tmp_path, monkeypatch, capsys):
    from sheared.config import save_config
    from sheared.pipeline import run_stage
    from sheared.run_dir import RunDir, checkpoint_name, write_manifest
    from sheared.train import loop

    calls = []
    monkeypatch.setattr(
        loop,
        "run",
        lambda cfg, run_dir, resume, restart, progress: calls.append((run_dir.name, resume, restart)),
    )
    cfg = _train_cfg()
    cfg.train.steps = 3
    run = RunDir(tmp_path / "continued")
    run_stage(cfg, run.path)  # nothing there yet
    assert calls == [("continued", False, False)]
    save_config(cfg, run.config)
    run.metrics.write_text('{"step": 1}\n')
    run_stage(cfg, run.path)  # stopped before its first checkpoint: moved aside, started again
    assert calls[-1] == ("continued", False, True)
    final = run.checkpoints / checkpoint_name(3)
    final.mkdir(parents=True)
    write_manifest(final)
    run_stage(cfg, run.path)
    assert len(calls) == 2 and "done before" in capsys.readouterr().out
    cfg.train.steps = 5  # a longer plan: the run is continued
    run_stage(cfg, run.path)
    assert calls[-1] == ("continued", True, False)
