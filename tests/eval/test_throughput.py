"""Throughput measurement: the order models take turns in, the threads it runs with, what it reports."""

import pytest
import torch
from helpers import VOCAB, tiny_hf_model

from sheared.errors import UserError
from sheared.eval.throughput import ThroughputSettings, measure_throughput, round_order, summarize

TINY = dict(batch_size=1, seq_len=8, prompt_len=4, new_tokens=3, rounds=3)


class Recorder(torch.nn.Module):
    """A stand-in causal LM that logs (name, pass, torch threads, new tokens) for every call."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, ids):
        self.log.append((self.name, "forward", torch.get_num_threads(), None))

    def generate(self, prompt, **kwargs):
        self.log.append((self.name, "generate", torch.get_num_threads(), kwargs["max_new_tokens"]))


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_models_alternate_pairwise_and_take_turns_going_first(two_torch_threads):
    log = []
    models = {n: Recorder(n, log) for n in ("A", "B")}
    measure_throughput(models, ThroughputSettings(**TINY, threads=1), VOCAB)
    warmup, measured = log[:4], log[4:]
    assert [(n, p, k) for n, p, _, k in warmup] == [
        ("A", "forward", None),
        ("A", "generate", 2),
        ("B", "forward", None),
        ("B", "generate", 2),
    ]
    round_a_first = [("A", "forward"), ("B", "forward"), ("B", "generate"), ("A", "generate")]
    round_b_first = [("B", "forward"), ("A", "forward"), ("A", "generate"), ("B", "generate")]
    assert [(n, p) for n, p, _, _ in measured] == round_a_first + round_b_first + round_a_first
    assert {k for _, p, _, k in measured if p == "generate"} == {TINY["new_tokens"]}
    assert {t for _, _, t, _ in log} == {1}  # every call ran with the stated thread count
    assert torch.get_num_threads() == 2  # and torch's own setting is back


def test_three_models_rotate():
    assert [n for n, p in round_order(["A", "B", "C"], 1) if p == "forward"] == ["B", "C", "A"]
    assert [n for n, p in round_order(["A", "B", "C"], 1) if p == "generate"] == ["A", "C", "B"]
    assert round_order(["A", "B", "C"], 3) == round_order(["A", "B", "C"], 0)


def test_torch_threads_restored_when_a_model_fails(two_torch_threads):
    class Broken(torch.nn.Module):
        def forward(self, ids):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_throughput({"broken": Broken()}, ThroughputSettings(**TINY, threads=1), VOCAB)
    assert torch.get_num_threads() == 2


def test_tiny_models_report_medians_within_min_max_and_paired_ratios(two_torch_threads):
    models = {"big": tiny_hf_model(seed=0), "small": tiny_hf_model(seed=1, num_hidden_layers=1)}
    settings = ThroughputSettings(**TINY)
    results = measure_throughput(models, settings, VOCAB)
    assert settings.threads == 1 and vars(settings)["threads"] == 1  # stated in eval.json's settings
    assert torch.get_num_threads() == 2
    for row in results.values():
        for p in ("forward", "generate"):
            assert row[f"{p}_tokens_per_s_min"] <= row[f"{p}_tokens_per_s"] <= row[f"{p}_tokens_per_s_max"]
            assert row[f"{p}_vs_first_min"] <= row[f"{p}_vs_first"] <= row[f"{p}_vs_first_max"]
            tokens = settings.batch_size * (settings.seq_len if p == "forward" else settings.new_tokens)
            assert row[f"{p}_tokens_per_s"] == pytest.approx(tokens / row[f"{p}_s"])
    assert results["big"]["forward_vs_first"] == results["big"]["generate_vs_first_max"] == 1.0


def test_summary_numbers():
    seconds = {
        "source": {"forward": [2.0, 4.0, 3.0], "generate": [1.0, 1.0, 2.0]},
        "pruned": {"forward": [1.0, 1.0, 2.0], "generate": [0.5, 1.0, 1.0]},
    }
    out = summarize(seconds, {"forward": 12, "generate": 6})
    source, pruned = out["source"], out["pruned"]
    assert (source["forward_s"], source["forward_tokens_per_s"]) == (3.0, 4.0)
    assert (source["forward_tokens_per_s_min"], source["forward_tokens_per_s_max"]) == (3.0, 6.0)
    # per round: 2/1, 4/1, 3/2 -> median 2, min 1.5, max 4 (the ratio of medians would be 3/1 = 3)
    assert (pruned["forward_vs_first"], pruned["forward_vs_first_min"], pruned["forward_vs_first_max"]) == (
        2.0,
        1.5,
        4.0,
    )
    assert (
        pruned["generate_vs_first"],
        pruned["generate_vs_first_min"],
        pruned["generate_vs_first_max"],
    ) == (
        2.0,
        1.0,
        2.0,
    )


@pytest.mark.parametrize("bad", [dict(threads=0), dict(rounds=0), dict(dtype="float16")])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        ThroughputSettings(**bad)
