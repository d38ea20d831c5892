"""What pruning adds to a training step: sampled masks, the L0 module and the Lagrangian, against a
plain step of the same model, alternating in one process; and the peak memory of each.

    .venv/bin/python bench/prune_overhead.py [--precision fp32|bf16] [--batch 4] [--seq 256] [--rounds 6]

The model has SmolLM2-135M's shape (random weights: speed does not depend on them) and is pruned
towards the demo target (24 / 512 / 4 heads in 2 KV groups / 1024; every mask type). One step =
forward, fused loss, backward (and for pruning the Lagrangian's backward), gradient clipping and an
AdamW step, exactly as the training loop runs it. Time: medians over rounds after one warm-up of
each, the order alternating. Peak memory: on CUDA, max_memory_allocated per variant; on CPU, each
variant in a fresh subprocess reporting its peak resident memory over two steps (sampled every
millisecond) minus the memory after building the model. Goals: time ratio <= 1.10, memory ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from sheared.eval.loss import fused_loss, next_token_labels
from sheared.hardware import machine_summary
from sheared.model import CausalLM, ModelArgs
from sheared.precision import Precision
from sheared.pruning import L0Module, LagrangianConstraint, TargetShape
from sheared.train.config import OptimConfig, PruningConfig
from sheared.train.loop import mask_generator
from sheared.train.optim import build_optimizer

SMOLLM2 = ModelArgs(
    family="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
DEMO_TARGET = TargetShape(24, 512, 4, 2, 1024)
GOAL_TIME, GOAL_MEMORY = 1.10, 1.15
KIB = 1024


def build(device: torch.device):
    torch.manual_seed(0)
    model = CausalLM(SMOLLM2)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device).train()
    l0 = L0Module(SMOLLM2, DEMO_TARGET).to(device)
    lagrangian = LagrangianConstraint(l0.specs).to(device)
    optimizer = build_optimizer(
        model.parameters(),
        OptimConfig(),
        l0.parameters(),
        lagrangian.parameters(),
        PruningConfig(target=DEMO_TARGET),
    )
    return model, l0, lagrangian, optimizer


def make_step(masked: bool, model, l0, lagrangian, optimizer, ids, precision: Precision):
    labels = next_token_labels(ids)
    device = ids.device

    def head(hidden, weight):
        return fused_loss(hidden, weight, labels)

    def step(index: int) -> None:
        masks = None
        if masked:
            l0.clamp_()
            masks = l0.sample(mask_generator(0, index, 0))
        with precision.autocast():
            parts = model(ids, masks, head=head)
        parts.loss.backward()
        if masked:
            lag, _ = lagrangian(l0.expected_sparsity(), l0.target_sparsity())
            lag.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _rss_kib() -> int:
    """Resident memory now (Linux /proc/self/statm), in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // KIB


def _release_free_memory() -> None:
    """Give freed heap pages back (glibc), so the start is not inflated by the build's temporaries."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """Highest resident memory above the start, sampled every millisecond by a thread (ru_maxrss is
    the process's lifetime peak, which building the model already sets)."""

    def __init__(self) -> None:
        self.start, self.peak, self._done = _rss_kib(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_kib())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_kib()) - self.start


def measure_memory_subprocess(masked: bool, ns) -> float:
    """Peak resident memory (MiB) of two steps of one variant in a fresh process, above its start."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-of",
        "masked" if masked else "plain",
        "--precision",
        ns.precision,
    ]
    cmd += ["--batch", str(ns.batch), "--seq", str(ns.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    device = torch.device(ns.device)
    precision = Precision.resolve(ns.precision, device)
    model, l0, lagrangian, optimizer = build(device)
    ids = torch.randint(
        0, SMOLLM2.vocab_size, (ns.batch, ns.seq), generator=torch.Generator().manual_seed(1)
    ).to(device)
    steps = {m: make_step(m, model, l0, lagrangian, optimizer, ids, precision) for m in (True, False)}
    if ns.memory_of is not None:  # the subprocess of one variant
        _release_free_memory()
        sampler = RssSampler()
        for i in range(2):
            steps[ns.memory_of == "masked"](i)
        print(json.dumps({"peak_mib": sampler.stop() / KIB}))
        return
    times: dict[bool, list[float]] = {True: [], False: []}
    peaks: dict[bool, float] = {}
    for r in range(ns.rounds + 1):
        for masked in (True, False) if r % 2 == 0 else (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            steps[masked](r)
            if r > 0:
                times[masked].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[masked] = max(peaks.get(masked, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if device.type == "cpu":
        peaks = {m: measure_memory_subprocess(m, ns) for m in (True, False)}
    t = {m: statistics.median(v) for m, v in times.items()}
    tokens = ns.batch * ns.seq
    print(f"machine: {machine_summary()}")
    print(
        f"SmolLM2-135M shape -> demo target, {ns.batch} x {ns.seq} tokens, {ns.precision}, {ns.rounds} rounds"
    )
    for m, label in ((False, "plain"), (True, "pruning")):
        print(
            f"{label:>8} step: {t[m] * 1e3:8.0f} ms ({tokens / t[m]:6.0f} tokens/s), peak memory {peaks[m]:7.0f} MiB"
        )
    time_ratio, memory_ratio = t[True] / t[False], peaks[True] / peaks[False]
    print(
        f"pruning / plain: time {time_ratio:.3f} (goal <= {GOAL_TIME}), memory {memory_ratio:.3f} (goal <= {GOAL_MEMORY})"
    )


if __name__ == "__main__":
    main()
