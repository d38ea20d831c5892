"""`sheared study` on the tiny model: every arm ends in a verified export of the exact target shape,
the budget holds per arm, finished arms are skipped, and the results are written."""

from __future__ import annotations

import json

from sheared.config import load_config
from sheared.study import ARMS, StudyConfig, plan_arm, run_study


def _config(tiny_assets, *overrides):
    base = [f"source={tiny_assets / 'source'}", f"data={tiny_assets / 'prepared'}"]
    return load_config(StudyConfig, "configs/tiny/study.yaml", [*base, *overrides])


def test_plans_spend_the_budget(tiny_assets):
    cfg = _config(tiny_assets, "budget_tokens=20000")
    seq, batch = 64, cfg.global_batch_size
    for name in ARMS:
        arm = plan_arm(name, cfg, seq, 2, best="activation")
        train_steps = int(next(o for o in arm.train if o.startswith("train.steps=")).split("=")[1])
        tokens = arm.calibration_tokens + (arm.prune_steps + train_steps) * batch * seq
        assert 20000 - batch * seq * 2 < tokens <= 20000, name  # within two steps of the budget
    l0 = plan_arm("l0-uniform", cfg, seq, 2, None)
    assert l0.prune_steps == round(20000 * cfg.prune_fraction) // (batch * seq)
    assert plan_arm("activation", cfg, seq, 2, None).calibration_tokens == 8 * 2 * 64
    assert "distill.teacher=source" in plan_arm("best+distill", cfg, seq, 2, "magnitude").train
    assert "data.dynamic=false" in plan_arm("best-fixed-mix", cfg, seq, 2, "magnitude").prune


def test_study_runs_every_arm_and_skips_finished_ones(tiny_assets, tmp_path, capsys):
    cfg = _config(tiny_assets, "arms=[scratch,activation,l0-uniform,best+distill]")
    summary = run_study(cfg, tmp_path / "study")
    assert list(summary["arms"]) == ["scratch", "activation", "l0-uniform", "best+distill"]
    for name, r in summary["arms"].items():
        report = json.loads((tmp_path / "study" / name / "final" / "export_report.json").read_text())
        assert report["verified"]
        assert (
            report["exported_shape"]["num_hidden_layers"] == 3
            and report["exported_shape"]["hidden_size"] == 48
        )
        assert r["tokens"] <= cfg.budget_tokens and r["curve"], name
    assert summary["arms"]["best+distill"]["base"] in ("activation", "l0-uniform")
    assert (tmp_path / "study" / "results.md").read_text().count(
        "\n| "
    ) == 5 + 1  # header row + source + 4 arms
    assert (tmp_path / "study" / "loss_vs_tokens.png").is_file()
    capsys.readouterr()
    run_study(cfg, tmp_path / "study")
    assert capsys.readouterr().out.count("done before") == 4
