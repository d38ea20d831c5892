"""Hardening (`pruning.harden_fraction`, SPEC §11): the last part of pruning trains under the exact-target
binary masks, so the exported model is the model the run trained: its first evaluation equals the
run's last masked one."""

from __future__ import annotations

import pytest
import torch

from sheared.eval.evaluate import per_domain
from sheared.export import export_run
from sheared.run_dir import EVAL_LOSS, RunDir, read_metrics
from sheared.train.loop import run

STEPS = ["train.steps=20", "train.eval_interval=10", "train.save_interval=10", "pruning.harden_fraction=0.25"]


@pytest.mark.parametrize("controller", ["projection", "lagrangian"])
def test_the_export_is_the_model_the_run_trained(tiny_config, tmp_path, controller):
    cfg = tiny_config(*STEPS, f"pruning.controller={controller}")
    run(cfg, tmp_path / "run", progress=False)
    last = read_metrics(tmp_path / "run")[-1]
    masked = {k[len(EVAL_LOSS) :]: v for k, v in last.items() if k.startswith(EVAL_LOSS)}
    export_run(tmp_path / "run", tmp_path / "pruned")
    exported = {d: v["loss"] for d, v in per_domain(str(tmp_path / "pruned"), cfg.data.path, 4, None).items()}
    assert exported.keys() == masked.keys()
    for domain in masked:  # the goal is 0.05 nats; the same model differs by float rounding only
        assert exported[domain] == pytest.approx(masked[domain], abs=1e-4), domain


def test_log_alpha_is_frozen_while_hardening(tiny_config, tmp_path):
    """The hardened steps (the last 5 of 20) leave log_alpha as it was after step 15: the final masks
    are the ones those steps trained under."""
    from sheared.model import load_source
    from sheared.pruning.controller import TargetController
    from sheared.run_dir import Trainable, list_checkpoints, load_module_weights

    cfg = tiny_config(*STEPS[:2], "train.save_interval=5", "train.keep_checkpoints=4", STEPS[3])
    run(cfg, tmp_path / "run", progress=False)
    step_15 = next(c for c in list_checkpoints(tmp_path / "run") if c.name == "step_000015")
    model = load_source(cfg.source, with_tokenizer=False).model
    l0 = TargetController.make_l0("projection", model.args, cfg.pruning.target)
    load_module_weights(step_15, Trainable(model, l0, None))
    final = RunDir(tmp_path / "run").load_masks()
    assert final["log_alpha"].keys() == dict(l0.log_alpha).keys()
    for name, value in final["log_alpha"].items():
        assert torch.equal(value, l0.log_alpha[name].detach()), name
        assert torch.equal(final["masks"][name], getattr(l0.deterministic("target"), name)), name
