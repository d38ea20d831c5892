"""The demo's plan fits its time budget, is kept for re-runs, and its summary compares every model."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from sheared import demo
from sheared.config import load_config
from sheared.train.config import TrainConfig
from sheared.train.deadline import StepTimes


def _train_cfg():
    return load_config(TrainConfig, "configs/smollm2-135m/train.yaml", ["model=unused"])


class Machine:
    """A simulated machine: a clock that advances by what each piece of work costs, times a factor."""

    def __init__(self):
        self.now, self.factor = 1_000_000.0, 1.0

    def clock(self) -> float:
        return self.now

    def spend(self, seconds: float) -> float:
        self.now += seconds * self.factor
        return seconds * self.factor


# What the probe measures on a loaded 2-core machine (seconds; issue 24: 32.5 s/step with distillation)
PROBE = demo.Probe(step_s=32.5, evaluation_s=20.0, checkpoint_s=4.0, setup_s=15.0)
EXPORT_S = 25.0
BEFORE_PLAN_S = 7 * 60  # make's virtual environment, the corpus, the data, one-shot pruning, its export


def _train(machine, budget, probe, steps, models, reports):
    """One demo training run as the loop runs it: step, evaluation, the deadline, checkpoint."""
    eval_interval, save_interval = demo._intervals(steps)
    deadline = budget.deadline(probe, EXPORT_S, models, reports)
    times, last, step = StepTimes(), steps, 0
    machine.spend(probe.setup_s)
    while step < last:
        times.steps.append(machine.spend(probe.step_s))
        if (step + 1) % eval_interval == 0 or step + 1 == last:
            times.evaluation = machine.spend(probe.evaluation_s)
        last = deadline.last_step(
            step + 1,
            last,
            times,
            lambda s: s % eval_interval == 0 or s == steps,
            lambda s: s % save_interval == 0,
        )
        if (step + 1) % save_interval == 0 or step + 1 == last:
            times.checkpoint = machine.spend(probe.checkpoint_s)
        step += 1
    machine.spend(EXPORT_S)
    return last, times


def simulate_demo(slowdown: float, minutes: float = 20.0, distill: bool = True, probe=PROBE) -> dict:
    """The demo's decisions in its order (`run_demo`), on a machine that slows down by `slowdown`
    right after the probe; the work after training costs what the probe measured, times that too."""
    machine = Machine()
    budget = demo.DemoBudget(minutes, machine.now, machine.clock)
    machine.spend(BEFORE_PLAN_S)
    machine.spend(probe.run_seconds(3))
    plan = budget.plan(probe, EXPORT_S, 400, comparison=distill)
    machine.factor = slowdown
    runs = 2 if plan["comparison"] else 1
    main_steps, measured = _train(machine, budget, probe, plan["steps"], runs + 2, runs + 1)
    done = {"planned": plan["steps"], "main": main_steps, "comparison": None, "throughput_rounds": 0}
    models, reports = 3, 2
    if plan["comparison"]:
        needed = budget.comparison_seconds(probe.slowed(measured), plan["steps"], EXPORT_S, 4, 3)
        if budget.fits(needed):
            done["comparison"], _ = _train(machine, budget, probe, plan["steps"], 4, 3)
            models, reports = 4, 3
    for _ in range(models):  # perplexity: each model loaded and evaluated (an evaluation holds two models)
        machine.spend(probe.evaluation_s / 2 + budget.MODEL_LOAD_S)
    machine.spend(reports * 5.0)
    rounds = budget.throughput_rounds(probe.slowed(measured), 5)
    if rounds >= 2:  # a round: both models forward and generating (about 1.2 training steps here)
        machine.spend(2 * budget.MODEL_LOAD_S + (rounds + 1) * 1.2 * probe.step_s)
        done["throughput_rounds"] = rounds
    done["minutes"] = budget.elapsed() / 60
    return done


QUIET = demo.Probe(step_s=8.0, evaluation_s=6.0, checkpoint_s=3.0, setup_s=10.0)  # the same machine, alone


@pytest.mark.parametrize("probe", [QUIET, PROBE], ids=["quiet", "loaded"])
def test_the_plan_uses_the_budget_on_a_steady_machine(probe):
    done = simulate_demo(slowdown=1.0, probe=probe)
    assert 17 < done["minutes"] <= 20  # the time is used, not wasted
    assert done["main"] == done["planned"]
    if probe is QUIET:
        assert done["comparison"] == done["main"] > 20 and done["throughput_rounds"] == 5
    else:  # a comparison of a few steps each is not worth halving the main run
        assert done["comparison"] is None and done["main"] >= 3 and done["throughput_rounds"] >= 3


@pytest.mark.parametrize("distill", [True, False])
def test_a_machine_twice_as_slow_after_the_probe_keeps_the_budget(distill):
    done = simulate_demo(slowdown=2.0, distill=distill, probe=QUIET)
    assert done["minutes"] <= 20
    if distill:  # the comparison gave way first; the main run kept its planned steps
        assert done["comparison"] is None and done["main"] == done["planned"]
    else:  # alone, the main run ended earlier, its schedule compressed
        assert 0 < done["main"] < done["planned"]


def test_a_machine_that_slows_down_4x_still_keeps_the_budget():
    for probe in (QUIET, PROBE):
        done = simulate_demo(slowdown=4.0, probe=probe)
        assert done["minutes"] <= 20 and 1 <= done["main"] < done["planned"]


def test_the_plan_is_capped_on_fast_machines():
    budget = demo.DemoBudget(20, 0.0, lambda: 60.0)
    fast = demo.Probe(step_s=0.05, evaluation_s=0.5, checkpoint_s=0.5, setup_s=2.0)
    assert budget.plan(fast, 5.0, 400, comparison=True) == {"steps": 400, "comparison": True}


def test_a_run_counts_its_evaluations_and_checkpoints():
    probe = demo.Probe(step_s=1.0, evaluation_s=10.0, checkpoint_s=100.0, setup_s=1000.0)
    assert demo._events(40) == (2, 2) and demo._events(41) == (3, 3)
    assert probe.run_seconds(40) == 1000 + 40 + 20 + 200


def test_the_plan_is_kept_for_re_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "probe_run", lambda cfg, run_dir, steps: PROBE)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cfg = demo.DemoConfig()
    budget = demo.DemoBudget(20, time.time() - 6.5 * 60)  # 6.5 minutes spent on the corpus, data and pruning
    plan = demo.make_plan(cfg, tmp_path, _train_cfg(), budget, EXPORT_S)
    assert plan["steps"] > 5 and plan["tokens"] == plan["steps"] * 4 * 256
    assert "plan:" in capsys.readouterr().out
    monkeypatch.setattr(demo, "probe_run", lambda *a: pytest.fail("probed again"))
    again = demo.make_plan(cfg, tmp_path, _train_cfg(), budget, EXPORT_S)
    assert again == json.loads((tmp_path / "plan.json").read_text()) == plan


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
        lambda cfg, run_dir, resume, restart, progress, deadline: calls.append(
            (run_dir.name, resume, restart)
        ),
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


def test_the_faster_thread_count_is_kept(monkeypatch, tmp_path):
    threads = {"now": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["now"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(now=n))
    speed = {1: 20.0, 2: 32.5}  # seconds per step: two threads beside a busy process are slower
    monkeypatch.setattr(
        demo,
        "probe_run",
        lambda cfg, run_dir, steps: dataclasses.replace(PROBE, step_s=speed[threads["now"]]),
    )
    probe, chosen = demo.probe_threads(None, tmp_path, 3)
    assert (probe.step_s, chosen, threads["now"]) == (20.0, 1, 1)
    threads["now"], speed[1] = 2, 40.0  # a quiet machine: two threads stay
    probe, chosen = demo.probe_threads(None, tmp_path, 3)
    assert (probe.step_s, chosen, threads["now"]) == (32.5, 2, 2)
