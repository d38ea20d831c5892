"""One-shot pruning runs (`pruning.method`), scores reuse, scored l0 init, and their refusals."""

from __future__ import annotations

import json

import pytest
import torch

from sheared.cli import main
from sheared.errors import UserError
from sheared.export import export_run
from sheared.pruning.importance import select_masks
from sheared.pruning.target import mask_specs
from sheared.report import write_report
from sheared.run_dir import RunDir, load_masks, read_final_state, read_metrics
from sheared.train.loop import run

SMALL = ["data.max_eval_sequences=2", "pruning.calibration=4"]


@pytest.mark.parametrize("method", ["activation", "magnitude", "random"])
def test_oneshot_run_writes_exact_masks_and_exports(tiny_config, tmp_path, method):
    cfg = tiny_config(f"pruning.method={method}", *SMALL)
    result = run(cfg, tmp_path / "run", progress=False)
    files = RunDir(tmp_path / "run")
    assert result.steps == 0 and set(result.eval_losses) == {"code", "docs"}
    masks = load_masks(files.path)["masks"]
    from sheared.model import load_source

    args = load_source(cfg.source, with_tokenizer=False).args
    for spec in mask_specs(args, cfg.pruning.target):
        assert torch.all(masks[spec.name].sum(-1) == spec.target_kept), spec.name
    scores = torch.load(files.scores, weights_only=True)
    assert set(scores["scores"]) == {"layer", "kv_group", "head", "intermediate", "hidden"}
    (record,) = read_metrics(files.path)
    assert record["step"] == 0 and record["tokens"] == (4 * 2 * 64 if method == "activation" else 0)
    assert record["expected_sparsity/intermediate"] == record["target_sparsity/intermediate"] == 0.5
    state = read_final_state(files.path)
    assert state["eval_losses"] == pytest.approx(result.eval_losses)
    report = export_run(files.path, tmp_path / "export")
    assert report["verified"] and report["max_abs_logit_diff"] <= 1e-4
    assert (
        report["exported_shape"]["num_hidden_layers"] == 3 and report["exported_shape"]["hidden_size"] == 48
    )
    assert report["masks_num_params"] == report["exported_num_params"]
    run_state = json.loads((tmp_path / "export" / "sheared_run_state.json").read_text())
    assert run_state["reference_losses"] == pytest.approx(state["reference_losses"])
    assert (write_report(files.path)).is_file()


def test_scores_are_reused_for_another_target(tiny_config, tmp_path):
    run(tiny_config("pruning.method=activation", *SMALL), tmp_path / "a", progress=False)
    other = tiny_config(
        "pruning.method=activation",
        "pruning.target.intermediate_size=32",
        "pruning.target.num_hidden_layers=2",
        f"pruning.scores={tmp_path / 'a' / 'scores.pt'}",
        *SMALL,
    )
    run(other, tmp_path / "b", progress=False)
    a = torch.load(tmp_path / "a" / "scores.pt", weights_only=True)["scores"]
    b = torch.load(tmp_path / "b" / "scores.pt", weights_only=True)
    assert all(torch.equal(a[k], b["scores"][k]) for k in a)
    assert b["calibration"]["reused_from"] == str(tmp_path / "a" / "scores.pt")
    from sheared.model import load_source

    args = load_source(other.source, with_tokenizer=False).args
    expected = select_masks(a, mask_specs(args, other.pruning.target))
    got = load_masks(tmp_path / "b")["masks"]
    assert all(torch.equal(getattr(expected, k), got[k]) for k in got)
    assert got["intermediate"].sum(-1).tolist() == [32.0] * 4


def test_scores_of_another_source_are_refused(tiny_config, tmp_path, capsys):
    bad = {"scores": {"layer": torch.zeros(7)}, "source": {}, "calibration": {}}
    torch.save(bad, tmp_path / "scores.pt")
    argv = ["prune", "--config", "configs/tiny/prune.yaml", "--run-dir", str(tmp_path / "run")]
    cfg = tiny_config()
    overrides = [f"source={cfg.source}", f"data.path={cfg.data.path}", "data.auto_prepare=null"]
    assert (
        main([*argv, *overrides, "pruning.method=activation", f"pruning.scores={tmp_path / 'scores.pt'}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "holds scores of another source (layer scores of shape (7,)" in err and err.count("\n") == 1


def test_bad_method_and_too_many_calibration_sequences(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    base = ["prune", "--config", "configs/tiny/prune.yaml", "--run-dir", str(tmp_path / "run")]
    base += [f"source={cfg.source}", f"data.path={cfg.data.path}", "data.auto_prepare=null"]
    assert main([*base, "pruning.method=minitron"]) == 2
    assert "'minitron' is not one of 'l0', 'activation', 'magnitude', 'random'" in capsys.readouterr().err
    assert main([*base, "pruning.method=activation", "pruning.calibration=401"]) == 2
    err = capsys.readouterr().err
    assert "pruning.calibration is 401 sequences per domain but domain 'code' has 400" in err
    assert err.count("\n") == 1
    assert main([*base, "pruning.method=random", "pruning.init=activation"]) == 2
    assert "applies to method l0 only" in capsys.readouterr().err
    with pytest.raises(UserError, match="has 400 training sequences"):
        run(
            tiny_config("pruning.init=activation", "pruning.calibration=500"), tmp_path / "r2", progress=False
        )


def test_dry_run_shows_the_method(capsys):
    argv = ["prune", "--config", "configs/tiny/prune.yaml", "--dry-run"]
    assert main([*argv, "pruning.method=activation", "pruning.width_scores=after_depth"]) == 0
    out = capsys.readouterr().out
    assert "method: activation one-shot: scores, then the exact target; no training steps" in out
    assert "calibration: 8 sequences per domain × 2 pass(es)" in out
    assert "tokens:" not in out  # no training steps
    assert main([*argv, "pruning.init=magnitude"]) == 0
    assert "method: l0 (learned hard-concrete masks), log_alpha init magnitude" in capsys.readouterr().out


def test_l0_with_activation_init_starts_from_the_ranking(tiny_config, tmp_path):
    cfg = tiny_config("pruning.init=activation", "train.steps=2", "train.eval_interval=2", *SMALL)
    run(cfg, tmp_path / "run", progress=False)
    files = RunDir(tmp_path / "run")
    scores = torch.load(files.scores, weights_only=True)["scores"]
    from sheared.model import load_source
    from sheared.pruning import L0Module
    from sheared.pruning.importance import row_ranks

    l0 = L0Module(load_source(cfg.source, with_tokenizer=False).args, cfg.pruning.target)
    l0.reset_parameters_from_scores(scores)
    for name, la in l0.log_alpha.items():
        assert torch.equal(row_ranks(la.detach()), row_ranks(scores[name])), name
    assert len(read_metrics(files.path)) == 2
