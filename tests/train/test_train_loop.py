"""Continued pretraining (`sheared train`): exact resume, loss going down, weights carried over."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sheared.config import load_config
from sheared.data.sampler import DomainMixtureSampler
from sheared.run_dir import read_metrics
from sheared.train.config import TrainConfig
from sheared.train.loop import run


def _config(tiny_export, data, *overrides):
    return load_config(
        TrainConfig,
        "configs/tiny/train.yaml",
        [f"model={tiny_export}", f"data.path={data}", "data.max_eval_sequences=2", *overrides],
    )


class Crash(RuntimeError):
    pass


def test_resume_two_plus_two_equals_four(tiny_export, tiny_assets, tmp_path, monkeypatch):
    data = tiny_assets / "prepared"
    overrides = ["train.steps=4", "train.save_interval=2", "train.eval_interval=2"]
    run(_config(tiny_export, data, *overrides), tmp_path / "full", progress=False)

    real_next = DomainMixtureSampler.next_global_batch
    calls = []

    def crash_at_step_3(self, size):  # the stream goes on from the pruning run's step: count this run's
        calls.append(self.step)
        if len(calls) == 3:
            raise Crash
        return real_next(self, size)

    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", crash_at_step_3)
    with pytest.raises(Crash):
        run(_config(tiny_export, data, *overrides), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", real_next)
    run(_config(tiny_export, data, *overrides), tmp_path / "resumed", resume=True, progress=False)

    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert len(full) == len(resumed) == 4
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"
        }
    # Bit for bit: export both final checkpoints and compare every tensor.
    from sheared.export import export_run

    export_run(tmp_path / "full", tmp_path / "full-export")
    export_run(tmp_path / "resumed", tmp_path / "resumed-export")
    a = load_file(tmp_path / "full-export" / "model.safetensors")
    b = load_file(tmp_path / "resumed-export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_and_weights_carry_over(tiny_export, tiny_assets, tmp_path):
    state = json.loads((tiny_export / "sheared_run_state.json").read_text())
    result = run(
        _config(tiny_export, tiny_assets / "prepared", "train.steps=40", "train.eval_interval=20"),
        tmp_path / "run",
        progress=False,
    )
    records = read_metrics(tmp_path / "run")
    first = records[0]
    # The first step draws from the pruning run's final weights, against its reference losses.
    assert {d: first[f"domain_weight/{d}"] for d in ("code", "docs")} == pytest.approx(
        state["domain_weights"]
    )
    assert records[19]["reference_loss/code"] == pytest.approx(state["reference_losses"]["code"])
    assert "expected_params" not in first  # no masks in continued pretraining
    early = sum(r["lm_loss"] for r in records[:5]) / 5
    late = sum(r["lm_loss"] for r in records[-5:]) / 5
    assert late < early - 0.3
    assert records[-1]["eval_loss/code"] < records[19]["eval_loss/code"]
    assert set(result.eval_losses) == {"code", "docs"}
