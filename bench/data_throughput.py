"""How fast the data path feeds a run: sampler + gather + host-to-device, against what training eats.

    .venv/bin/python bench/data_throughput.py [--data data/prepared/smollm2-135m] [--batch 32] [--seconds 10]

Draws global batches exactly as the training loop does (`DomainMixtureSampler.next_global_batch`,
`rank_slice`, the loop's `_gather` of memory-mapped token files, `.to(device)`), for `--seconds`,
and reports tokens/s. The need: the tokens/s a SmolLM2 training step consumes on this machine
(measured here in the same process: a pruning step of the demo config at 2 x 256), and the 7B
recipes' need from docs/scaling.md (18k tokens/s for 8 GPUs pruning LLaMA2-7B, 185k tokens/s for 16
GPUs continuing 1.3B). Goal: >= 100x the need.
"""

from __future__ import annotations

import argparse
import time

import torch

from sheared.data.sampler import DomainMixtureSampler, rank_slice
from sheared.data.tokens import PreparedData
from sheared.hardware import machine_summary
from sheared.train.loop import _gather

RECIPE_NEEDS = {"llama2-7b prune-1.3b, 8 GPUs": 18_000, "llama2-7b continue-1.3b, 16 GPUs": 185_000}
GOAL = 100


def delivered_tokens_per_s(data: PreparedData, batch: int, seconds: float, device: torch.device) -> float:
    domains = data.domains
    sampler = DomainMixtureSampler(
        domains, [data.num_sequences(d, "train") for d in domains], [1 / len(domains)] * len(domains), 0
    )
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        items = rank_slice(sampler.next_global_batch(batch), 0, 1)
        ids = _gather(data, items).to(device, non_blocking=True)
        tokens += ids.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def consumed_tokens_per_s(steps: int = 3) -> float:
    """A pruning step of the demo config (SmolLM2-135M, 2 x 256) on this machine, median of `steps`."""
    import shutil
    import statistics
    import tempfile

    from sheared.config import load_config
    from sheared.run_dir import read_metrics
    from sheared.train.config import PruneConfig
    from sheared.train.loop import run

    tmp = tempfile.mkdtemp()
    try:
        cfg = load_config(
            PruneConfig,
            "configs/smollm2-135m/prune.yaml",
            [f"train.steps={steps + 1}", f"train.eval_interval={steps + 2}", "data.max_eval_sequences=1"],
        )
        cfg.data.reference_losses = dict.fromkeys(
            PreparedData.open(cfg.data.path, verify="size").domains, 1.0
        )
        run(cfg, f"{tmp}/run", progress=False)
        return statistics.median(r["tokens_per_s"] for r in read_metrics(f"{tmp}/run")[1:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/prepared/smollm2-135m")
    parser.add_argument("--batch", type=int, default=32, help="sequences per global batch")
    parser.add_argument("--seconds", type=float, default=10.0)
    ns = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = PreparedData.open(ns.data, verify="size")
    delivered = delivered_tokens_per_s(data, ns.batch, ns.seconds, device)
    print(f"machine: {machine_summary()}")
    print(f"data path: {delivered:,.0f} tokens/s ({ns.batch} x {data.seq_len} per batch, to {device})")
    need = consumed_tokens_per_s()
    print(
        f"SmolLM2 pruning step here: {need:,.0f} tokens/s -> data path {delivered / need:,.0f}x the need (goal >= {GOAL}x)"
    )
    for name, tokens in RECIPE_NEEDS.items():
        print(f"{name}: {tokens:,} tokens/s -> {delivered / tokens:,.1f}x (one loader process per node)")


if __name__ == "__main__":
    main()
