"""Pruning vs plain training steps of a random ~1B LLaMA on one GPU: tokens/s, peak memory, ratio.

    python bench/gpu_smoke.py                 # the GPU check (bf16 autocast, ~1.1B parameters)
    python bench/gpu_smoke.py --tiny --cpu    # the same code path in seconds on a CPU

Both variants run the same model and batches, alternating: a pruning step (mask sample per
micro-batch, masked forward, Lagrangian, three optimizer groups) and a plain step (no masks).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sheared.eval.lm import next_token_loss
from sheared.model import CausalLM, ModelArgs, parameter_counts
from sheared.pruning import L0Module, LagrangianConstraint, TargetShape
from sheared.train.config import OptimConfig, PruningConfig
from sheared.train.loop import mask_generator
from sheared.train.optim import build_optimizer

ONE_B = ModelArgs(  # 1.1B parameters: LLaMA-style, GQA 2
    family="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
)
ONE_B_TARGET = TargetShape(
    num_hidden_layers=16,
    hidden_size=1536,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=4096,
)
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 tensor-core peak (NVIDIA datasheet)


def train_flops_per_token(args: ModelArgs, seq: int) -> float:
    """Training FLOPs per token of the unmasked model: 6 x (non-embedding + output projection weights)
    for the matrix products, plus 12 x L x H x D x seq / 2 for causal attention scores and values."""
    counts = parameter_counts(args)
    weights = counts["num_params_non_embedding"] + args.vocab_size * args.hidden_size
    attention = 12 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * seq / 2
    return 6 * weights + attention


TINY = ModelArgs(
    family="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
TINY_TARGET = TargetShape(3, 48, 2, 1, 96)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (checks the script runs)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument(
        "--steps", type=int, default=6, help="measured steps of each kind (after one warm-up each)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_BF16_TFLOPS,
        help="the device's dense bf16 peak, for MFU (H100/H200 SXM: 989)",
    )
    a = parser.parse_args()
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    args, target = (TINY, TINY_TARGET) if a.tiny else (ONE_B, ONE_B_TARGET)
    seq = min(a.seq, 64) if a.tiny else a.seq
    torch.manual_seed(0)

    with torch.device(device):
        model = CausalLM(args)
    model.init_weights(torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else None)
    l0 = L0Module(args, target).to(device)
    lagrangian = LagrangianConstraint(l0.specs).to(device)
    pruning = PruningConfig(target=target)
    optimizer = build_optimizer(
        model.parameters(), OptimConfig(), l0.parameters(), lagrangian.parameters(), pruning
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab_size, (a.micro_batch, seq), generator=g).to(device)
        for _ in range(a.accum)
    ]

    def step(masked: bool, index: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for m, ids in enumerate(batches):
            masks = None
            if masked:
                l0.clamp_()
                masks = l0.sample(mask_generator(0, index, m))
            with autocast:
                logits = model(ids, masks)
            (next_token_loss(logits, ids) / a.accum).backward()
        if masked:
            lag, _ = lagrangian(l0.expected_sparsity(), l0.target_sparsity())
            lag.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    times = {True: [], False: []}
    peak = {}
    for i in range(a.steps + 1):
        for masked in (True, False) if i % 2 == 0 else (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = step(masked, i)
            if i > 0:
                times[masked].append(t)
            if device.type == "cuda":
                peak[masked] = max(peak.get(masked, 0), torch.cuda.max_memory_allocated())
    tokens = a.accum * a.micro_batch * seq
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; model {parameter_counts(args)['num_params'] / 1e9:.2f}B parameters, bf16 autocast, "
        f"{a.accum} x {a.micro_batch} x {seq} tokens per step"
    )
    flops = train_flops_per_token(args, seq)
    for masked, label in ((True, "pruning"), (False, "plain  ")):
        t = statistics.median(times[masked])
        mem = f", peak memory {peak[masked] / 2**30:.1f} GiB" if masked in peak else ""
        mfu = tokens / t * flops / (a.peak_tflops * 1e12)
        print(f"{label} step: {t * 1e3:8.1f} ms, {tokens / t:9.0f} tokens/s, MFU {mfu:.1%}{mem}")
    print(
        f"pruning / plain step time: {statistics.median(times[True]) / statistics.median(times[False]):.2f}"
    )


if __name__ == "__main__":
    main()
