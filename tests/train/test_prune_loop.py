"""The pruning loop end to end on the tiny config: targets reached, metrics, masks, exact resume."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sheared.data.sampler import DomainMixtureSampler
from sheared.errors import UserError
from sheared.run_dir import read_metrics
from sheared.train.checkpoint import list_checkpoints
from sheared.train.loop import run

STEP_KEYS = {
    "step",
    "tokens",
    "loss",
    "lm_loss",
    "lag_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "expected_params",
}
MASK_TYPES = ("layer", "kv_group", "head", "intermediate", "hidden")


# the projection lands at any length, so it runs a quarter of the Lagrangian's 200 steps
@pytest.mark.parametrize(
    "controller, tolerance, steps, learned", [("projection", 1e-5, 48, 0.5), ("lagrangian", 0.02, 200, 2.0)]
)
def test_tiny_run_reaches_every_target(tiny_config, tmp_path, controller, tolerance, steps, learned):
    every = steps // 8
    cfg = tiny_config(
        f"pruning.controller={controller}",
        f"train.steps={steps}",
        f"train.eval_interval={every}",
        f"train.save_interval={steps // 2}",
    )
    result = run(cfg, tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    last = records[-1]
    for name in MASK_TYPES:
        gap = abs(last[f"expected_sparsity/{name}"] - last[f"target_sparsity/{name}"])
        assert gap < tolerance, name
        assert (f"lambda1/{name}" in last and f"lambda2/{name}" in last) == (controller == "lagrangian")
    assert STEP_KEYS <= set(last)
    assert {"domain_weight/code", "domain_weight/docs"} <= set(last)
    evals = [r for r in records if "eval_loss/code" in r]
    assert [r["step"] for r in evals] == list(range(every, steps + 1, every))
    assert all("reference_loss/docs" in r for r in evals)
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - learned  # the random model learns
    assert set(result.eval_losses) == {"code", "docs"}

    # Exact-target masks: exactly the target count in every row.
    saved = torch.load(tmp_path / "run" / "masks" / "masks.pt")
    masks = saved["masks"]
    target = cfg.pruning.target
    assert masks["layer"].sum() == target.num_hidden_layers
    assert masks["hidden"].sum() == target.hidden_size
    assert (masks["kv_group"].sum(-1) == target.num_key_value_heads).all()
    assert (masks["head"].sum(-1) == target.heads_per_group).all()
    assert (masks["intermediate"].sum(-1) == target.intermediate_size).all()
    summary = json.loads((tmp_path / "run" / "masks" / "masks.json").read_text())
    assert (
        len(summary["kept_layers"]) == target.num_hidden_layers
        and summary["hidden_size"] == target.hidden_size
    )
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [
        f"step_{steps // 2:06d}",
        f"step_{steps:06d}",
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


class Crash(RuntimeError):
    pass


def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    overrides = [
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=2",
        "data.max_eval_sequences=2",
    ]
    full = run(tiny_config(*overrides), tmp_path / "full", progress=False)

    real_next = DomainMixtureSampler.next_global_batch

    def crash_at_step_4(self, size):
        if self.step == 4:
            raise Crash
        return real_next(self, size)

    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", crash_at_step_4)
    with pytest.raises(Crash):
        run(tiny_config(*overrides), tmp_path / "crashed", progress=False)
    assert [c.name for c in list_checkpoints(tmp_path / "crashed")] == ["step_000003"]
    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", real_next)
    resumed = run(tiny_config(*overrides), tmp_path / "crashed", resume=True, progress=False)

    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(expected, got):
        for key in a:
            if key != "tokens_per_s":
                assert a[key] == b[key], (a["step"], key)
    a = torch.load(tmp_path / "full" / "masks" / "masks.pt")
    b = torch.load(tmp_path / "crashed" / "masks" / "masks.pt")
    for name in a["log_alpha"]:
        assert torch.equal(a["log_alpha"][name], b["log_alpha"][name])
    assert full.domain_weights == resumed.domain_weights


def test_existing_run_is_not_overwritten(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=1", "train.eval_interval=1", "data.max_eval_sequences=1")
    run(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_data_of_another_tokenizer_is_refused(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=1")
    meta_path = tmp_path / "prepared" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="prepared with tokenizer"):
        run(cfg, tmp_path / "run", progress=False)
