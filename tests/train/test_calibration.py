"""Scores are not taken on trust: `pruning.scores` made from another model of the same shape, on other
calibration data, or holding NaN is refused in one line naming what differs; a folder or an option that
nothing reads is refused before anything runs; a file from before fingerprints is accepted with a note."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from sheared.cli import main
from sheared.data.tokens import METADATA_FILE, PreparedData
from sheared.errors import UserError
from sheared.model.loading import weights_fingerprint
from sheared.model.random_source import SourceInit, ensure_source
from sheared.run_dir import load_masks
from sheared.train.calibration import calibration_fingerprint, check_scores_option
from sheared.train.config import PruningConfig
from sheared.train.loop import run

SMALL = ["data.max_eval_sequences=2", "pruning.calibration=4"]


@pytest.fixture(scope="module")
def scored(tiny_assets, tmp_path_factory):
    """One-shot activation scores of the tiny source (its run folder and scores.pt)."""
    from sheared.config import load_config
    from sheared.train.config import PruneConfig

    root = tmp_path_factory.mktemp("scored")
    cfg = load_config(
        PruneConfig,
        "configs/tiny/prune.yaml",
        [
            f"source={tiny_assets / 'source'}",
            f"data.path={tiny_assets / 'prepared'}",
            "data.auto_prepare=null",
            "pruning.method=activation",
            *SMALL,
        ],
    )
    run(cfg, root / "a", progress=False)
    return root / "a"


def _prune(tiny_assets, run_dir, *overrides, data=None, source=None) -> list[str]:
    return [
        "prune",
        "--config",
        "configs/tiny/prune.yaml",
        "--run-dir",
        str(run_dir),
        f"source={source or tiny_assets / 'source'}",
        f"data.path={data or tiny_assets / 'prepared'}",
        "data.auto_prepare=null",
        *SMALL,
        *overrides,
    ]


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sheared: error: "), err
    return err.removeprefix("sheared: error: ").rstrip("\n")


def _bytes(*paths) -> dict[str, bytes]:
    return {
        str(f): f.read_bytes()
        for p in paths
        for f in ([p] if p.is_file() else sorted(p.rglob("*")))
        if f.is_file()
    }


def test_scores_record_what_they_were_measured_from(scored, tiny_assets):
    content = torch.load(scored / "scores.pt", weights_only=True)
    data = PreparedData.open(tiny_assets / "prepared", verify="size")
    assert content["fingerprint"] == {
        "source_weights": weights_fingerprint(tiny_assets / "source"),
        "calibration_sequences_per_domain": 4,
        "calibration_data": calibration_fingerprint(data, 4),
    }
    assert calibration_fingerprint(data, 5) != calibration_fingerprint(data, 4)
    assert calibration_fingerprint(data, 401) is None  # 400 training sequences a domain
    assert "fingerprint" not in content["calibration"]


def test_scores_of_another_model_of_the_same_shape_are_refused(scored, tiny_assets, tmp_path, capsys):
    other = tmp_path / "other-source"
    ensure_source(SourceInit(seed=1), other)  # the tiny shape, other random weights
    before = _bytes(scored / "scores.pt")
    argv = _prune(tiny_assets, tmp_path / "run", "pruning.method=activation", source=other)
    err = _refused([*argv, f"pruning.scores={scored / 'scores.pt'}"], capsys)
    mine, theirs = weights_fingerprint(tiny_assets / "source"), weights_fingerprint(other)
    assert mine != theirs
    assert err == (
        f"pruning.scores '{scored / 'scores.pt'}' was computed from other source weights (fingerprint "
        f"{mine[:12]}…, this source's {theirs[:12]}…); drop pruning.scores to compute them again"
    )
    assert _bytes(scored / "scores.pt") == before
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_scores_of_other_calibration_data_are_refused(scored, tiny_assets, tmp_path, capsys):
    data = tmp_path / "prepared"
    shutil.copytree(tiny_assets / "prepared", data)
    path = data / "docs.train.bin"
    ids = np.fromfile(path, dtype="<u2")
    ids[:64] = ids[64:128]  # the first (calibration) sequence of docs is another one
    ids.tofile(path)
    metadata = json.loads((data / METADATA_FILE).read_text())
    metadata["domains"]["docs"]["splits"]["train"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (data / METADATA_FILE).write_text(json.dumps(metadata))
    before = _bytes(scored / "scores.pt", data)
    argv = _prune(tiny_assets, tmp_path / "run", "pruning.method=activation", data=data)
    err = _refused([*argv, f"pruning.scores={scored / 'scores.pt'}"], capsys)
    stored = calibration_fingerprint(PreparedData.open(tiny_assets / "prepared", verify="size"), 4)
    here = calibration_fingerprint(PreparedData.open(data, verify="size"), 4)
    assert err == (
        f"pruning.scores '{scored / 'scores.pt'}' was computed from other calibration data (the first 4 training "
        f"sequences of every domain: fingerprint {stored[:12]}…, this data's {here[:12]}…); drop pruning.scores "
        "to compute them again"
    )
    assert _bytes(scored / "scores.pt", data) == before


def test_non_finite_scores_a_folder_and_an_unused_option_are_refused(scored, tiny_assets, tmp_path, capsys):
    content = torch.load(scored / "scores.pt", weights_only=True)
    content["scores"] = {k: torch.full_like(v, torch.nan) for k, v in content["scores"].items()}
    torch.save(content, tmp_path / "nan.pt")
    before = _bytes(scored, tmp_path / "nan.pt")
    argv = _prune(tiny_assets, tmp_path / "run", "pruning.method=activation")
    err = _refused([*argv, f"pruning.scores={tmp_path / 'nan.pt'}"], capsys)
    assert err == (
        f"pruning.scores '{tmp_path / 'nan.pt'}' holds scores that are not finite (4 of 4 layer scores are NaN or "
        "infinite); compute them again"
    )
    err = _refused([*argv, f"pruning.scores={scored}"], capsys)
    assert err == (
        f"pruning.scores '{scored}' is a directory; give the scores.pt file of an earlier run "
        f"({scored / 'scores.pt'} is there)"
    )
    argv = _prune(tiny_assets, tmp_path / "run", "pruning.method=l0", "pruning.init=uniform")
    unused = (
        "pruning.scores is given but nothing uses scores: method l0 with init uniform learns its masks from a "
        "uniform start; drop pruning.scores, or set pruning.init to activation, magnitude or oneshot"
    )
    assert _refused([*argv, f"pruning.scores={scored / 'scores.pt'}"], capsys) == unused
    assert _refused([*argv, f"pruning.scores={scored / 'scores.pt'}", "--dry-run"], capsys) == unused
    budget = PruningConfig(target={"params_fraction": 0.5}, scores=str(scored / "scores.pt"))
    check_scores_option(budget)  # a budget's loss search ranks its candidates by them
    with pytest.raises(UserError, match="nothing uses scores"):
        check_scores_option(dataclasses.replace(budget, search="rule"))
    assert _bytes(scored, tmp_path / "nan.pt") == before
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_older_scores_without_a_fingerprint_are_accepted_with_a_note(scored, tiny_assets, tmp_path, capsys):
    content = torch.load(scored / "scores.pt", weights_only=True)
    del content["fingerprint"]
    torch.save(content, tmp_path / "old.pt")
    argv = _prune(
        tiny_assets, tmp_path / "run", "pruning.method=activation", f"pruning.scores={tmp_path / 'old.pt'}"
    )
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [
        f"sheared: note: pruning.scores '{tmp_path / 'old.pt'}' has no fingerprint of its source and calibration "
        "data (written by an older sheared); only its shapes were checked"
    ]
    got, expected = load_masks(tmp_path / "run")["masks"], load_masks(scored)["masks"]
    assert all(torch.equal(got[k], expected[k]) for k in expected)
