"""`train.precision: auto` picks bf16 only where the hardware computes it natively (SPEC §10)."""

from __future__ import annotations

import pytest
import torch

from sheared import hardware
from sheared.precision import resolve_precision
from sheared.run_dir import read_metrics
from sheared.train.loop import run

CPU = torch.device("cpu")
AVX2_ONLY = ["fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c"]
SAPPHIRE_RAPIDS = [*AVX2_ONLY, "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_ONLY, "fp32"), ([*AVX2_ONLY, "avx512f", "avx512bw"], "fp32"), (SAPPHIRE_RAPIDS, "bf16")],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    precision, why = resolve_precision("auto", CPU)
    assert precision == expected
    assert ("lacks avx512_bf16/amx_bf16" in why) == (expected == "fp32")


@pytest.mark.parametrize("configured", ["fp32", "bf16"])
def test_explicit_precision_is_kept(monkeypatch, configured):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2_ONLY)
    assert resolve_precision(configured, CPU) == (configured, "as configured")


def test_auto_run_on_an_avx2_cpu_trains_in_fp32(monkeypatch, tiny_config, tmp_path, capsys):
    """The run says what it chose; its losses equal an explicit fp32 run's bit for bit."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2_ONLY)
    steps = ["train.steps=2", "train.eval_interval=2", "data.max_eval_sequences=2"]
    run(tiny_config("train.precision=auto", *steps), tmp_path / "auto")
    assert "precision: fp32 (CPU lacks avx512_bf16/amx_bf16" in capsys.readouterr().out
    run(tiny_config("train.precision=fp32", *steps), tmp_path / "fp32", progress=False)
    a, b = read_metrics(tmp_path / "auto"), read_metrics(tmp_path / "fp32")
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]
