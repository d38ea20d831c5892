"""`sheared study` on the tiny model: every arm ends in a verified export of the exact target shape,
the budget holds per arm, finished arms are skipped, and the results are written."""

from __future__ import annotations

import json

import pytest

from sheared.config import load_config, read_yaml
from sheared.run_dir import read_metrics
from sheared.study import ARMS, StudyConfig, plan_arm, prune_config, run_study, train_config
from sheared.train.config import PruneConfig, TrainConfig


def _config(tiny_assets, *overrides):
    base = [f"source={tiny_assets / 'source'}", f"data={tiny_assets / 'prepared'}"]
    return load_config(StudyConfig, "configs/tiny/study.yaml", [*base, *overrides])


def test_plans_spend_the_budget(tiny_assets):
    cfg = _config(tiny_assets, "budget_tokens=20000")
    seq, batch = 64, cfg.global_batch_size
    for name in ARMS:
        arm = plan_arm(name, cfg, seq, 2, best="activation")
        tokens = arm.calibration_tokens + (arm.prune_steps + arm.train_steps) * batch * seq
        assert 20000 - batch * seq * 2 < tokens <= 20000, name  # within two steps of the budget
    l0 = plan_arm("l0-uniform", cfg, seq, 2, None)
    assert l0.prune_steps == round(20000 * cfg.prune_fraction[0]) // (batch * seq)
    assert plan_arm("activation", cfg, seq, 2, None).calibration_tokens == 8 * 2 * 64
    distill = plan_arm("best+distill", cfg, seq, 2, "magnitude")
    assert train_config(distill, cfg, "model").distill.teacher == "source"
    assert prune_config(distill, cfg).distill.alpha == cfg.distill_alpha
    fixed = plan_arm("best-fixed-mix", cfg, seq, 2, "magnitude")
    assert not prune_config(fixed, cfg).data.dynamic and not train_config(fixed, cfg, "m").data.dynamic


def test_typed_configs_equal_the_dotted_overrides(tiny_assets):
    """The study builds its runs' configs as typed values; they equal what the dotted overrides of the
    same settings give (the way the study built them before)."""
    cfg = _config(tiny_assets, "budget_tokens=20000")
    target = [f"pruning.target.{k}={v}" for k, v in vars(cfg.target).items()]
    common = [
        f"data.path={cfg.data}",
        "data.auto_prepare=null",
        f"train.global_batch_size={cfg.global_batch_size}",
        f"train.micro_batch_size={cfg.global_batch_size}",
        f"train.seed={cfg.seeds[0]}",
    ]
    l0 = plan_arm("l0-uniform", cfg, 64, 2, None)
    prune_eval = -(-l0.prune_steps // cfg.evaluations)
    expected = load_config(
        PruneConfig,
        cfg.prune_config,
        [
            f"source={cfg.source}",
            "source_init=null",
            *common,
            *target,
            "pruning.init=uniform",
            f"train.steps={l0.prune_steps}",
            f"train.eval_interval={prune_eval}",
            f"train.save_interval={l0.prune_steps}",
        ],
    )
    assert prune_config(l0, cfg) == expected
    scratch = plan_arm("scratch", cfg, 64, 2, None)
    steps = scratch.train_steps
    expected = load_config(
        TrainConfig,
        cfg.train_config,
        [
            "model=m",
            *common,
            f"train.steps={steps}",
            f"train.eval_interval={-(-steps // cfg.evaluations)}",
            f"train.save_interval={steps}",
            f"optim.lr={cfg.scratch_lr[0]}",
        ],
    )
    assert train_config(scratch, cfg, "m") == expected


def test_study_runs_every_arm_and_skips_finished_ones(tiny_assets, tmp_path, capsys):
    cfg = _config(tiny_assets, "arms=[scratch,activation,l0-uniform,best+distill]")
    summary = run_study(cfg, tmp_path / "study")
    assert list(summary["arms"]) == ["scratch", "activation", "l0-uniform", "best+distill"]
    for name, r in summary["arms"].items():
        report = json.loads(
            (tmp_path / "study" / name / "seed-0" / "final" / "export_report.json").read_text()
        )
        assert report["verified"]
        assert (
            report["exported_shape"]["num_hidden_layers"] == 3
            and report["exported_shape"]["hidden_size"] == 48
        )
        assert r["tokens"] <= cfg.budget_tokens and r["curve"], name
    assert summary["arms"]["best+distill"]["base"] in ("activation", "l0-uniform")
    # every pruned arm lands on the target and its export is the model it trained (SPEC §11)
    for name in ("activation", "l0-uniform", "best+distill"):
        landed = summary["arms"][name]["seeds"]["0"]["landing"]
        assert landed["off_target"] <= 0.005 and abs(landed["export_gap"]) <= 0.05, (name, landed)
    l0 = summary["arms"]["l0-uniform"]["seeds"]["0"]["landing"]
    evaluated = [
        r
        for r in read_metrics(tmp_path / "study" / "l0-uniform" / "seed-0" / "prune")
        if "eval_loss/code" in r
    ]
    last = [v for k, v in evaluated[-1].items() if k.startswith("eval_loss/")]
    assert l0["masked_eval_loss"] == pytest.approx(sum(last) / len(last))
    assert "landing" not in summary["arms"]["scratch"]["seeds"]["0"]
    # header row + source + 4 arms; the paired table: header + the 3 arms other than activation; the
    # landing table: header + the 3 pruned arms
    assert (tmp_path / "study" / "results.md").read_text().count("\n| ") == (1 + 1 + 4) + (1 + 3) + (1 + 3)
    assert (tmp_path / "study" / "loss_vs_tokens.png").is_file()
    capsys.readouterr()
    run_study(cfg, tmp_path / "study")
    assert capsys.readouterr().out.count("done before") == 4


def test_seeds_sweeps_and_paired_differences(tiny_assets, tmp_path):
    """Seeds, a prune-fraction sweep, the l0-oneshot arm and the scratch learning-rate sweep on the tiny
    config: every (arm, seed) runs once, choices read the validation split, results pair the seeds."""
    cfg = _config(
        tiny_assets,
        "arms=[scratch,activation,l0-oneshot]",
        "seeds=[0,1]",
        "prune_fraction=[0.25,0.5]",
        "scratch_lr=[1e-3,3e-3]",
        "scratch_sweep_fraction=0.5",
        "evaluations=1",
    )
    summary = run_study(cfg, tmp_path / "study")
    assert list(summary["arms"]) == ["scratch", "activation", "l0-oneshot@0.25", "l0-oneshot@0.5"]
    assert summary["val_split"] == "val"
    sweep = summary["scratch_lr_sweep"]
    assert set(sweep["val_loss"]) == {"0.001", "0.003"}
    assert sweep["chosen"] == float(min(sweep["val_loss"], key=sweep["val_loss"].get))
    for name, r in summary["arms"].items():
        assert set(r["seeds"]) == {"0", "1"}, name
        means = [r["seeds"][s]["mean_eval_loss"] for s in ("0", "1")]
        assert r["mean_eval_loss"] == pytest.approx(sum(means) / 2)
        assert r["sd_eval_loss"] == pytest.approx(abs(means[0] - means[1]) / 2**0.5)
        assert r["seeds"]["0"]["val_split"] == "val" and r["mean_val_loss"] > 0
    scratch = summary["arms"]["scratch"]["seeds"]["0"]
    trained = read_yaml(tmp_path / "study" / "scratch" / "seed-0" / "train" / "config.yaml")
    assert trained["optim"]["lr"] == sweep["chosen"]  # the scratch arm trains at the swept rate
    l0 = summary["arms"]["l0-oneshot@0.25"]["seeds"]["1"]
    assert l0["prune_steps"] < summary["arms"]["l0-oneshot@0.5"]["seeds"]["1"]["prune_steps"]
    paired = summary["paired"]
    assert paired["reference"] == "activation"
    act = summary["arms"]["activation"]["seeds"]
    diffs = [
        summary["arms"]["scratch"]["seeds"][s]["mean_eval_loss"] - act[s]["mean_eval_loss"]
        for s in ("0", "1")
    ]
    assert paired["differences"]["scratch"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["differences"]["scratch"]["seeds"] == 2
    assert scratch["train_steps"] > 0
    assert "Paired differences" in (tmp_path / "study" / "results.md").read_text()
