"""SIGKILL a subprocess run at a random step after its first checkpoint and in the middle of a
checkpoint write; `--resume` then ends bit-identical to an uninterrupted run (every metric but the
timing, every mask)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sheared.config import load_config
from sheared.run_dir import RunDir, read_metrics
from sheared.train.config import PruneConfig
from sheared.train.loop import run

pytestmark = pytest.mark.slow
STEPS = 8
POLL_S = 0.005
TIMEOUT_S = 300


def _overrides(tiny_assets, data) -> list[str]:
    return [
        f"source={tiny_assets / 'source'}",
        f"data.path={data}",
        "data.auto_prepare=null",
        f"train.steps={STEPS}",
        "train.save_interval=2",
        "train.eval_interval=3",
        "data.max_eval_sequences=2",
    ]


def _start(run_dir, overrides) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sheared",
        "prune",
        "--config",
        "configs/tiny/prune.yaml",
        "--run-dir",
        str(run_dir),
    ]
    return subprocess.Popen([*cmd, *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, condition) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _compare(expected_dir, got_dir) -> None:
    a, b = read_metrics(expected_dir), read_metrics(got_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "tokens_per_s"} == {
            k: v for k, v in rb.items() if k != "tokens_per_s"
        }
    ma = torch.load(RunDir(expected_dir).masks, weights_only=True)
    mb = torch.load(RunDir(got_dir).masks, weights_only=True)
    for part in ("masks", "log_alpha"):
        assert all(torch.equal(ma[part][k], mb[part][k]) for k in ma[part])


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sigkill")
    shutil.copytree(tiny_assets / "prepared", root / "prepared")
    overrides = _overrides(tiny_assets, root / "prepared")
    run(load_config(PruneConfig, "configs/tiny/prune.yaml", overrides), root / "full", progress=False)
    return root, overrides


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_step(uninterrupted, tmp_path, seed):
    root, overrides = uninterrupted
    # metrics lines written before the kill: from 3 on, step 2's checkpoint is complete (a run killed
    # before its first checkpoint starts again only with --restart: test_reliability.py)
    kill_after = random.Random(seed).randint(3, STEPS - 1)
    proc = _start(tmp_path / "run", overrides)
    _kill_when(proc, lambda: len(read_metrics(tmp_path / "run")) >= kill_after)
    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", overrides)
    run(cfg, tmp_path / "run", resume=True, progress=False)
    _compare(root / "full", tmp_path / "run")


def test_kill_during_a_checkpoint_write(uninterrupted, tmp_path):
    root, overrides = uninterrupted
    checkpoints = RunDir(tmp_path / "run").checkpoints
    proc = _start(tmp_path / "run", overrides)
    second = checkpoints / "step_000004.tmp"  # the second checkpoint: the first is there to resume from
    _kill_when(proc, second.exists)
    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", overrides)
    run(cfg, tmp_path / "run", resume=True, progress=False)
    assert not any(p.name.endswith(".tmp") for p in checkpoints.iterdir())
    _compare(root / "full", tmp_path / "run")
