"""Loop options: compiled decoder layers compute the eager loss; the reference's global clipping."""

from __future__ import annotations

import pytest

from sheared.run_dir import read_metrics
from sheared.train.loop import run

STEPS = ["train.steps=3", "train.eval_interval=3", "data.max_eval_sequences=1"]


@pytest.mark.slow  # compiling the layers takes about a minute on 2 cores
def test_compiled_layers_give_the_eager_loss(tiny_config, tmp_path):
    run(tiny_config(*STEPS), tmp_path / "eager", progress=False)
    run(tiny_config(*STEPS, "train.compile=true"), tmp_path / "compiled", progress=False)
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert eager[-1]["eval_loss/code"] == pytest.approx(compiled[-1]["eval_loss/code"], rel=1e-5)


def test_clipping_masks_with_the_model_uses_one_global_norm(tiny_config, tmp_path):
    run(tiny_config(*STEPS), tmp_path / "model", progress=False)
    run(tiny_config(*STEPS, "optim.clip_masks_with_model=true"), tmp_path / "all", progress=False)
    model_only, everything = read_metrics(tmp_path / "model")[0], read_metrics(tmp_path / "all")[0]
    assert everything["lm_loss"] == model_only["lm_loss"]  # the same first forward pass ...
    assert (
        everything["grad_norm"] > model_only["grad_norm"]
    )  # ... but the norm includes log_alpha and lambdas
