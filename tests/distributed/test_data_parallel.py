"""Data parallelism on CPU with gloo under torchrun: 2 ranks == 1 rank with gradient accumulation.

Data and mask samples are seeded by step and global micro-batch index, never by rank, so DDP and
FSDP2 over 2 processes must reproduce the single-process run (up to float reduction order).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import free_port, subprocess_env

from sheared.config import load_config
from sheared.model import load_source
from sheared.pruning.controller import TargetController
from sheared.run_dir import read_metrics
from sheared.train.checkpoint import Trainable, list_checkpoints, load_module_weights
from sheared.train.config import PruneConfig

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=4", "train.eval_interval=2", "train.save_interval=2", "data.max_eval_sequences=2"]
TOLERANCE = 1e-5


def _launch(nproc: int, run_dir, overrides: list[str], resume: bool = False) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "sheared",
        "prune",
        "--config",
        "configs/tiny/prune.yaml",
        "--run-dir",
        str(run_dir),
        *(["--resume"] if resume else []),
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]


def _state(run_dir, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Model, log_alpha (and lambdas under the Lagrangian) of the newest checkpoint, as plain tensors."""
    model = load_source(cfg.source, with_tokenizer=False).model
    trainable = Trainable(
        model, *TargetController.saved_modules(cfg.pruning.controller, model.args, cfg.pruning.target)
    )
    load_module_weights(list_checkpoints(run_dir)[-1], trainable)
    return {k: v.detach().clone() for k, v in trainable.state_dict().items()}


def _compare(a_dir, b_dir, cfg) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(
                ("loss", "lm_loss", "lag_loss", "eval_loss", "lambda", "expected", "domain_weight")
            ):
                assert ra[key] == pytest.approx(rb[key], abs=TOLERANCE, rel=TOLERANCE), (ra["step"], key)
    sa, sb = _state(a_dir, cfg), _state(b_dir, cfg)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=TOLERANCE, rtol=TOLERANCE, msg=k)


@pytest.fixture(scope="module")
def single(tiny_assets, tmp_path_factory):
    """One process: 2 micro-batches of 4 per step (global batch 8)."""
    root = tmp_path_factory.mktemp("single")
    overrides = [
        f"source={tiny_assets / 'source'}",
        f"data.path={tiny_assets / 'prepared'}",
        "data.auto_prepare=null",
        *STEPS,
    ]
    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", overrides)
    from sheared.train.loop import run

    run(cfg, root / "run", progress=False)
    return root / "run", overrides, cfg


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(single, tmp_path, strategy):
    run_dir, overrides, cfg = single
    _launch(2, tmp_path / "run", [*overrides, f"distributed.strategy={strategy}", "train.micro_batch_size=4"])
    _compare(run_dir, tmp_path / "run", cfg)
    summary = json.loads((tmp_path / "run" / "masks" / "masks.json").read_text())
    assert summary == json.loads((run_dir / "masks" / "masks.json").read_text()) | {
        "expected_minus_target_sparsity": summary["expected_minus_target_sparsity"]
    }


def test_two_ranks_resume_identically(single, tmp_path):
    """A 2-rank FSDP run that lost its last checkpoint resumes from step 2 and ends identically."""
    import shutil

    run_dir, overrides, cfg = single
    args = [*overrides, "distributed.strategy=fsdp"]
    _launch(2, tmp_path / "run", args)
    shutil.rmtree(
        tmp_path / "run" / "checkpoints" / "step_000004"
    )  # as if it crashed after step 2's checkpoint
    _launch(2, tmp_path / "run", args, resume=True)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_000002", "step_000004"]
    _compare(run_dir, tmp_path / "run", cfg)


def test_resume_on_another_number_of_ranks(single, tmp_path):
    """The stream does not depend on the ranks and checkpoints reshard: 2 ranks -> 1 rank works."""
    import shutil

    run_dir, overrides, cfg = single
    _launch(2, tmp_path / "run", [*overrides, "distributed.strategy=ddp"])
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000004")
    from sheared.train.loop import run

    run(
        load_config(PruneConfig, "configs/tiny/prune.yaml", overrides),
        tmp_path / "run",
        resume=True,
        progress=False,
    )
    _compare(run_dir, tmp_path / "run", cfg)


def test_oneshot_scores_and_masks_equal_on_1_and_2_processes(tiny_assets, tmp_path):
    """Each rank calibrates its share (7 sequences per domain: uneven shares, padded); the float64 sums
    are all-reduced, so the scores are bit-identical to one process and the masks equal."""
    overrides = [
        f"source={tiny_assets / 'source'}",
        f"data.path={tiny_assets / 'prepared'}",
        "data.auto_prepare=null",
        "pruning.method=activation",
        "pruning.calibration=7",
        "data.max_eval_sequences=2",
    ]
    _launch(1, tmp_path / "one", overrides)
    _launch(2, tmp_path / "two", overrides)
    a = torch.load(tmp_path / "one" / "scores.pt", weights_only=True)["scores"]
    b = torch.load(tmp_path / "two" / "scores.pt", weights_only=True)["scores"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = torch.load(tmp_path / "one" / "masks" / "masks.pt", weights_only=True)["masks"]
    mb = torch.load(tmp_path / "two" / "masks" / "masks.pt", weights_only=True)["masks"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_with_a_teacher(tiny_assets, tmp_path, strategy):
    """Distillation from the source (replicated under DDP, sharded under FSDP2) keeps the equivalence."""
    from sheared.train.loop import run

    overrides = [
        f"source={tiny_assets / 'source'}",
        f"data.path={tiny_assets / 'prepared'}",
        "data.auto_prepare=null",
        "distill.teacher=source",
        "distill.alpha=0.5",
        "distill.temperature=2.0",
        *STEPS,
    ]
    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", overrides)
    run(cfg, tmp_path / "one", progress=False)
    _launch(2, tmp_path / "two", [*overrides, f"distributed.strategy={strategy}", "train.micro_batch_size=4"])
    _compare(tmp_path / "one", tmp_path / "two", cfg)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for ra, rb in zip(a, b):
        for key in [k for k in ra if k in ("ce_loss", "kd_loss") or k.startswith("eval_kl/")]:
            assert ra[key] == pytest.approx(rb[key], abs=TOLERANCE, rel=TOLERANCE), (ra["step"], key)
    assert "kd_loss" in a[-1] and "eval_kl/code" in a[-1]


def test_two_ranks_equal_one_rank_under_the_lagrangian(tiny_assets, tmp_path):
    """The paper's controller: the multipliers are replicated like log_alpha, and their gradients are
    averaged over ranks, so the lambdas and masks of 2 DDP ranks equal one process's."""
    from sheared.train.loop import run

    overrides = [
        f"source={tiny_assets / 'source'}",
        f"data.path={tiny_assets / 'prepared'}",
        "data.auto_prepare=null",
        "pruning.controller=lagrangian",
        *STEPS,
    ]
    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", overrides)
    run(cfg, tmp_path / "one", progress=False)
    _launch(2, tmp_path / "two", [*overrides, "distributed.strategy=ddp", "train.micro_batch_size=4"])
    _compare(tmp_path / "one", tmp_path / "two", cfg)
    assert any(k.startswith("lambda") for k in read_metrics(tmp_path / "two")[-1])
