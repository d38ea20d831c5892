"""`sheared study` on the tiny model: every arm ends in a verified export of the exact target shape,
the budget holds per arm, finished arms are skipped, and the results are written."""

from __future__ import annotations

import json

import pytest
from helpers import tree_bytes

from sheared.cli import main
from sheared.config import load_config, read_yaml
from sheared.errors import UserError
from sheared.run_dir import read_metrics
from sheared.study import (
    ARMS,
    StudyConfig,
    arm_identity,
    check_budget,
    check_finished_arms,
    plan_arm,
    planned_tokens,
    prune_config,
    run_study,
    train_config,
)
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


# --- the budget and what defines an arm (no arm runs: the refusals come first) --------------------------


def test_a_budget_an_arm_would_overspend_is_refused_with_the_smallest_that_fits(tiny_assets, tmp_path):
    # one step is 8 × 64 = 512 tokens; activation calibration is 8 sequences × 2 domains × 64 = 1,024
    cfg = _config(tiny_assets, "budget_tokens=1000")
    with pytest.raises(UserError) as e:
        run_study(cfg, tmp_path / "study")
    assert str(e.value) == (
        "budget_tokens 1,000 is too small: activation would train 1,536 tokens (one step is 8 × 64 = 512 tokens; "
        "calibration counts too); the smallest budget that fits every arm is 2,048 tokens"
    )
    assert not (tmp_path / "study").exists()
    for budget, fits in (
        (2047, False),
        (2048, True),
    ):  # l0-activation: calibration, a pruning and a training step
        trial = _config(tiny_assets, f"budget_tokens={budget}")
        if fits:
            check_budget(trial, 64, 2)
        else:
            with pytest.raises(UserError, match="the smallest budget that fits every arm is 2,048 tokens"):
                check_budget(trial, 64, 2)
    with pytest.raises(UserError, match=r"scratch would train 512 tokens .* fits every arm is 512 tokens"):
        check_budget(_config(tiny_assets, "budget_tokens=300", "arms=[scratch]"), 64, 2)
    sweep = _config(tiny_assets, "budget_tokens=1024", "arms=[scratch]", "scratch_lr=[1e-3,3e-3]")
    with pytest.raises(UserError, match=r"the scratch learning-rate sweep needs one step .* is 2,046 tokens"):
        check_budget(sweep, 64, 2)  # a quarter of the budget for each rate: round(2,046 / 4) = 512 tokens


def _finish(done, result) -> None:
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps(result))


def test_a_finished_arm_made_with_another_budget_target_batch_or_fraction_is_refused(
    tiny_assets, tmp_path, capsys
):
    old = _config(tiny_assets, "arms=[magnitude,l0-uniform]")
    out = tmp_path / "study"
    for label in ("magnitude", "l0-uniform"):
        _finish(
            out / label / "seed-0" / "result.json", {"identity": arm_identity(old, label), "tokens": 8192}
        )
    before = tree_bytes(out)
    changes = {
        "budget_tokens=16384": "magnitude/seed-0/result.json was made with budget_tokens 8,192, not 16,384",
        "global_batch_size=4": "magnitude/seed-0/result.json was made with global_batch_size 8, not 4",
        "target.hidden_size=32": (
            "magnitude/seed-0/result.json was made with target 3 layers, hidden 48, 1 query head in 1 KV group, "
            "intermediate 64, not 3 layers, hidden 32, 1 query head in 1 KV group, intermediate 64"
        ),
        "prune_fraction=0.25": "l0-uniform/seed-0/result.json was made with prune_fraction 0.5, not 0.25",
    }
    for change, message in changes.items():
        with pytest.raises(UserError) as e:
            run_study(_config(tiny_assets, "arms=[magnitude,l0-uniform]", change), out)
        assert str(e.value).startswith(f"{out}/{message}; use another --out, or delete {out}/"), str(e.value)
        assert tree_bytes(out) == before
    # a result of older code (no identity) is checked by its tokens
    result = json.loads((out / "magnitude" / "seed-0" / "result.json").read_text())
    del result["identity"]
    result["tokens"] = 16384  # made with budget_tokens 16384
    (out / "magnitude" / "seed-0" / "result.json").write_text(json.dumps(result))
    before = tree_bytes(out)
    assert (
        planned_tokens(plan_arm("magnitude", old, 64, 2, None), old, 64) == 8192
    )  # 16 steps, no calibration
    with pytest.raises(UserError, match=r"was made on 16,384 tokens but this study plans 8,192 for it"):
        run_study(_config(tiny_assets, "arms=[magnitude]"), out)
    assert tree_bytes(out) == before
    result["tokens"] = 8192
    (out / "magnitude" / "seed-0" / "result.json").write_text(json.dumps(result))
    check_finished_arms(_config(tiny_assets, "arms=[magnitude]"), out, 64, 2)
    assert "records no budget or target; only its tokens were checked" in capsys.readouterr().err


def test_a_study_records_each_arms_identity_and_a_file_as_out_is_one_line(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    import sheared.study as study

    def finished(arm, cfg, out):  # what run_arm returns, without running anything
        out.mkdir(parents=True, exist_ok=True)
        loss = {"code": 1.0, "docs": 2.0}
        return {
            "arm": arm.name,
            "tokens": planned_tokens(arm, cfg, 64),
            "seconds": {"total": 1.0},
            "curve": [],
            "eval_loss": loss,
            "mean_eval_loss": 1.5,
            "mean_val_loss": 1.5,
            "val_split": "val",
        }

    monkeypatch.setattr(study, "run_arm", finished)
    monkeypatch.setattr(study, "_source_losses", lambda cfg, out: {"code": 0.5, "docs": 0.5})
    cfg = _config(tiny_assets, "arms=[scratch,random]")
    run_study(cfg, tmp_path / "study")
    for label in ("scratch", "random"):
        stored = json.loads((tmp_path / "study" / label / "seed-0" / "result.json").read_text())
        assert stored["identity"] == {
            "budget_tokens": 8192,
            "target": cfg.target.as_dict(),
            "global_batch_size": 8,
            "prune_fraction": None,
        }
    with pytest.raises(
        UserError, match=r"scratch/seed-0/result.json was made with budget_tokens 8,192, not 4,096"
    ):
        run_study(_config(tiny_assets, "arms=[scratch,random]", "budget_tokens=4096"), tmp_path / "study")

    (tmp_path / "a-file").write_text("not a folder\n")
    argv = ["study", "--config", "configs/tiny/study.yaml", "--out", str(tmp_path / "a-file")]
    assert main([*argv, f"source={tiny_assets / 'source'}", f"data={tiny_assets / 'prepared'}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"sheared: error: --out {tmp_path / 'a-file'} is a file; give a folder (a new one, or the folder of a "
        "study to finish)\n"
    )
    assert (tmp_path / "a-file").read_text() == "not a folder\n"
