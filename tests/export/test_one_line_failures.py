"""A failed export verification ends `sheared study` and `sheared demo` (which export through
`sheared.pipeline.export_stage`) the way it ends `sheared export`: one line, exit code 2, no
traceback, and no export where one was expected."""

from __future__ import annotations

import math
import shutil

import pytest

from sheared.cli import main
from sheared.export import export as export_module

PROBLEM = "sheared: error: the export of {run} failed verification: the reloaded export differs from the model by nan"


@pytest.fixture
def broken_reload(monkeypatch):
    """Every reload computes NaN: the real export runs and fails its real verification."""
    real = export_module.reload_logits
    monkeypatch.setattr(export_module, "reload_logits", lambda out, ids: real(out, ids) * math.nan)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err  # transformers' progress bars may come first
    assert "Traceback" not in err and err.count("sheared: error:") == 1 and err.endswith("\n")
    return err.splitlines()[-1]


def test_study(tiny_assets, tmp_path, broken_reload, capsys):
    argv = ["study", "--config", "configs/tiny/study.yaml", "--out", str(tmp_path / "study")]
    source, data = f"source={tiny_assets / 'source'}", f"data={tiny_assets / 'prepared'}"
    assert main([*argv, source, data, "arms=[activation]"]) == 2
    arm = tmp_path / "study" / "activation" / "seed-0"
    assert _one_line(capsys).startswith(PROBLEM.format(run=arm / "prune"))
    assert not (arm / "pruned").exists() and (arm / "pruned.unverified" / "export_report.json").is_file()


def test_demo(tiny_assets, tmp_path, broken_reload, capsys):
    shutil.copytree(tiny_assets / "prepared", tmp_path / "prepared")
    overrides = [
        f"source={tiny_assets / 'source'}",
        f"prepared_dir={tmp_path / 'prepared'}",
        "prune_config=configs/tiny/prune.yaml",
        "prune_overrides=[train.steps=1,train.save_interval=1,train.eval_interval=1,data.max_eval_sequences=1]",
        "max_new_tokens=1",
    ]
    assert main(["demo", "--run-dir", str(tmp_path / "demo"), *overrides]) == 2
    assert _one_line(capsys).startswith(PROBLEM.format(run=tmp_path / "demo" / "prune"))
    assert not (tmp_path / "demo" / "pruned").exists()
