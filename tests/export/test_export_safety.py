"""An export is swapped in only once verified: a failure (a full disk, a wrong slice, NaN weights) or a
SIGKILL at any moment leaves the previous export as it was, and the printed verdict equals the report."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sheared.cli import main
from sheared.errors import UserError
from sheared.export import REPORT_FILE, export_run
from sheared.export import export as export_module


@pytest.fixture(scope="module")
def pruned_run(tiny_assets, tmp_path_factory):
    from sheared.config import load_config
    from sheared.train.config import PruneConfig
    from sheared.train.loop import run

    root = tmp_path_factory.mktemp("pruned-run")
    shutil.copytree(tiny_assets / "prepared", root / "prepared")
    overrides = [
        f"source={tiny_assets / 'source'}",
        f"data.path={root / 'prepared'}",
        "data.auto_prepare=null",
    ]
    overrides += [
        "train.steps=4",
        "train.save_interval=2",
        "train.eval_interval=2",
        "data.max_eval_sequences=2",
    ]
    run(load_config(PruneConfig, "configs/tiny/prune.yaml", overrides), root / "run", progress=False)
    return root / "run"


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_export_leaves_the_previous_one(pruned_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    export_run(pruned_run, out)
    before = _snapshot(out)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(export_module, "save_hf", no_space)
    assert main(["export", str(pruned_run), "--out", str(out), "--force"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "sheared: error:" in line]
    assert "No space left on device" in err and "nothing was replaced" in err
    assert _snapshot(out) == before
    assert not list(tmp_path.glob("*.export-tmp"))


def test_a_wrong_export_is_never_swapped_in(pruned_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    export_run(pruned_run, out)
    before = _snapshot(out)
    real = export_module.reload_logits
    monkeypatch.setattr(export_module, "reload_logits", lambda out, ids: real(out, ids) * math.nan)
    assert main(["export", str(pruned_run), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err  # transformers' progress bars, then one line
    assert "Traceback" not in err and err.endswith("\n")
    err = err.splitlines()[-1]
    assert err.startswith("sheared: error: export failed verification, nothing was replaced: ")
    assert "differs from the model by nan" in err and f"see {tmp_path / 'export.unverified'}" in err
    assert _snapshot(out) == before  # the previous export stays
    failed = json.loads((tmp_path / ("export" + export_module.FAILED_SUFFIX) / REPORT_FILE).read_text())
    assert failed["verified"] is False  # the verdict printed equals the report's


def test_non_finite_weights_are_refused(pruned_run, tmp_path, monkeypatch):
    real = export_module._trained_weights_and_masks

    def poisoned(run, model):
        result = real(run, model)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
        return result

    monkeypatch.setattr(export_module, "_trained_weights_and_masks", poisoned)
    with pytest.raises(UserError, match=r"non-finite weights \(model.layers.0.mlp.up_proj.weight"):
        export_run(pruned_run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_sigkill_during_export_never_leaves_a_half_export(pruned_run, tmp_path):
    """Kill `sheared export --force` at random moments: --out always holds a complete verified export."""
    out = tmp_path / "export"
    export_run(pruned_run, out)
    before = _snapshot(out)
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "sheared", "export", str(pruned_run), "--out", str(out), "--force"]
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = json.loads((out / REPORT_FILE).read_text())
        assert report["verified"] is True
        assert set(_snapshot(out)) == set(before)  # every file of an export is there
    assert main(["export", str(pruned_run), "--out", str(out), "--force"]) == 0
    assert not list(tmp_path.glob("*.export-tmp"))  # the leftover of a killed export is cleaned
