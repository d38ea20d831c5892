"""Where the time of a training step goes: a torch-profiler breakdown of one plain and one pruning step.

    python bench/profile_step.py --tiny                                    # seconds, on a CPU
    python bench/profile_step.py --shape 1b --batch 8 --micro-batch 4 --seq 2048 --out runs/profile/1b
    python bench/profile_step.py --shape smollm2 --batch 32 --micro-batch 32 --seq 256 --out runs/profile/smollm2

A random model (`--shape 1b`: bench/gpu_smoke.py's 1.1B LLaMA and its target; `--shape smollm2`: the
SmolLM2-135M shape pruned towards the demo target, as bench/prune_overhead.py; `--tiny`: a 4-layer toy)
runs training steps the way `sheared.train.loop.train_step` runs them: per micro-batch the ids moved to
the device, a mask sample from the L0 module (`mask_generator`, pruning only), the forward with the fused
chunked loss as the model's `head`, backward and the loss values read back (`.item()`, as the loop
logs them); then the Lagrangian and its backward (pruning), gradient clipping of the model weights
(its norm read back), one AdamW step of `build_optimizer`'s groups, and the mask record the loop logs
after every pruning step. Not included: the data sampler and memory-mapped gather, DDP/FSDP2 wrappers,
the metrics file, evaluation.

After warm-up, `--steps` steps of each kind are timed without the profiler (alternating), then
`--steps` of each kind are profiled (torch.profiler, CPU and CUDA activities, record_shapes). Printed:
wall time, tokens/s and MFU (CUDA); the top-25 ops by self device time (CUDA) or self CPU time (CPU);
where the time goes, by category; and pruning minus plain per category.

Categories. Every op of a profiled step is attributed to the phase it ran in, by record_function
ranges around data / mask sampling / forward / loss / sync / Lagrangian / clipping / optimizer; an op
of the backward pass takes the phase of the forward op that made its autograd node (matched by the
autograd sequence number), so the loss's and the masks' backward count with the loss and the masks.
Ops of the model's forward and backward are split by what they are: matmuls (mm/addmm/bmm/linear/matmul
kernels), attention (scaled_dot_product_attention and its backward) and the rest (elementwise, norms,
RoPE, casts, embedding). Time per op: on CUDA the summed duration of the kernels it launched (the step's
wall time minus all kernel time is "GPU idle": launch gaps, syncs, host work); on a CPU its self CPU
time (the wall time outside every op is "outside ops": Python and the interpreter around the ops).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts

from gpu_smoke import ONE_B, ONE_B_TARGET, PEAK_BF16_TFLOPS, TINY, TINY_TARGET, train_flops_per_token
from prune_overhead import DEMO_TARGET, SMOLLM2

from sheared.eval.loss import fused_loss, next_token_labels
from sheared.hardware import machine_summary
from sheared.model import CausalLM, ModelArgs, parameter_counts
from sheared.precision import Precision
from sheared.pruning import L0Module, LagrangianConstraint, TargetShape
from sheared.pruning.constraint import warmed_up_target
from sheared.train.config import OptimConfig, PruningConfig
from sheared.train.loop import mask_generator
from sheared.train.optim import build_optimizer, lr_multiplier, set_learning_rates

SHAPES: dict[str, tuple[ModelArgs, TargetShape]] = {
    "1b": (ONE_B, ONE_B_TARGET),
    "smollm2": (SMOLLM2, DEMO_TARGET),
    "tiny": (TINY, TINY_TARGET),
}
# (batch, micro-batch, seq) when not given: gpu_smoke's step; the study's step; a toy
DEFAULT_BATCH = {"1b": (8, 4, 2048), "smollm2": (32, 32, 256), "tiny": (4, 2, 64)}
SCHEDULE_STEPS = 1000  # a notional run length for the learning-rate schedule and the Lagrangian warm-up
KINDS = ("plain", "pruning")

# record_function ranges of this script
RANGE = "step:"
STEP = RANGE + "step"
DATA, MASKS, FORWARD, LOSS, BACKWARD, SYNC = "data", "masks", "forward", "loss", "backward", "sync"
LAGRANGIAN, MASK_RECORD, CLIP, OPTIMIZER = "lagrangian", "mask_record", "clip", "optimizer"

# categories, in print order
MATMUL = "matmuls (model)"
ATTENTION = "attention (SDPA)"
ELEMENTWISE = "elementwise/norm/RoPE/casts"
LOSS_CAT = "loss (fused chunked)"
OPTIMIZER_CAT = "optimizer (AdamW, lr)"
CLIP_CAT = "gradient clipping"
MASK_CAT = "masks/L0/Lagrangian"
OTHER_CAT = "data/loss read-back/other"
GAP_CUDA = "GPU idle (launch gaps, syncs)"
GAP_CPU = "outside ops (Python, overhead)"
PHASE_CATEGORY = {
    LOSS: LOSS_CAT,
    OPTIMIZER: OPTIMIZER_CAT,
    CLIP: CLIP_CAT,
    MASKS: MASK_CAT,
    LAGRANGIAN: MASK_CAT,
    MASK_RECORD: MASK_CAT,
    DATA: OTHER_CAT,
    SYNC: OTHER_CAT,
    STEP[len(RANGE) :]: OTHER_CAT,  # inside the step, outside every phase range
}
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::_addmm_activation",
    "aten::addmv",
    "aten::mv",
}
BACKWARD_NODE = "autograd::engine::evaluate_function: "
TRACE_GZIP_BYTES = 1 << 20  # traces larger than this are written gzipped


def categories(device_type: str) -> list[str]:
    gap = GAP_CUDA if device_type == "cuda" else GAP_CPU
    return [
        MATMUL,
        ATTENTION,
        ELEMENTWISE,
        LOSS_CAT,
        OPTIMIZER_CAT,
        CLIP_CAT,
        MASK_CAT,
        OTHER_CAT,
        gap,
    ]


# --- the step -------------------------------------------------------------------------------------


class Run:
    """One model, its L0 module, multipliers and optimizer, and the batches of one step."""

    def __init__(self, a: argparse.Namespace, device: torch.device):
        self.args, self.target = SHAPES[a.shape]
        self.device = device
        self.precision = Precision.resolve(a.precision, device)
        self.accum = a.batch // a.micro_batch
        self.seq = a.seq
        torch.manual_seed(0)
        with torch.device(device):
            self.model = CausalLM(self.args)
        self.model.init_weights(torch.Generator(device=device).manual_seed(0))
        self.model.train()
        self.l0 = L0Module(self.args, self.target).to(device)
        self.l0.reset_parameters(torch.Generator().manual_seed(0))
        self.lagrangian = LagrangianConstraint(self.l0.specs).to(device)
        self.pruning = PruningConfig(target=self.target)
        self.optim = OptimConfig()
        self.optimizer = build_optimizer(
            self.model.parameters(),
            self.optim,
            self.l0.parameters(),
            self.lagrangian.parameters(),
            self.pruning,
        )
        g = torch.Generator().manual_seed(1)
        # on the CPU, as the loop's gather of memory-mapped tokens leaves them
        self.batches = [
            torch.randint(0, self.args.vocab_size, (a.micro_batch, a.seq), generator=g)
            for _ in range(self.accum)
        ]

    @property
    def tokens(self) -> int:
        return self.accum * self.batches[0].numel()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, pruning: bool, index: int) -> float:
        """One optimizer step as `train_step` takes it; its wall time in seconds (device synced)."""
        self.sync()
        start = time.perf_counter()
        with record_function(STEP):
            self._step(pruning, index)
            self.sync()
        return time.perf_counter() - start

    def _step(self, pruning: bool, index: int) -> None:
        l0, accum = self.l0, self.accum
        with record_function(RANGE + OPTIMIZER):
            set_learning_rates(
                self.optimizer,
                lr_multiplier(index, SCHEDULE_STEPS, self.optim.warmup_fraction, self.optim.min_lr_ratio),
            )
        sums = torch.zeros(3, dtype=torch.float64)
        for m, cpu_ids in enumerate(self.batches):
            with record_function(RANGE + DATA):
                ids = cpu_ids.to(self.device)
            masks = None
            if pruning:
                with record_function(RANGE + MASKS):
                    l0.clamp_()
                    masks = l0.sample(mask_generator(0, index, m))
            with record_function(RANGE + FORWARD):
                labels = next_token_labels(ids)

                def head(hidden: torch.Tensor, weight: torch.Tensor, labels=labels):
                    with record_function(RANGE + LOSS):
                        return fused_loss(hidden, weight, labels)

                with self.precision.autocast():
                    parts = self.model(ids, masks, head=head)
            with record_function(RANGE + BACKWARD):
                (parts.loss / accum).backward()
            with record_function(RANGE + SYNC):
                values = [parts.loss.item(), parts.ce.item(), parts.kd.item()]
                sums += torch.tensor(values, dtype=torch.float64) / accum
        lag_loss = torch.zeros(())
        lag_parts: dict[str, torch.Tensor] = {}
        target: dict[str, float] = {}
        if pruning:
            with record_function(RANGE + LAGRANGIAN):
                warmup = round(self.pruning.lagrangian_warmup_fraction * SCHEDULE_STEPS)
                target = warmed_up_target(l0.target_sparsity(), index, warmup)
                lag_loss, lag_parts = self.lagrangian(l0.expected_sparsity(), target)
                lag_loss.backward()
        with record_function(RANGE + CLIP):
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip))
        with record_function(RANGE + SYNC):
            lm_loss = sums.tolist()[0]
            finite = math.isfinite(lm_loss + float(lag_loss.detach()) + grad_norm)
        assert finite, "a non-finite loss or gradient norm"
        with record_function(RANGE + OPTIMIZER):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if pruning:  # what `_mask_record` logs after every pruning step
            with record_function(RANGE + MASK_RECORD), torch.no_grad():
                record = {}
                for name, s_hat in l0.expected_sparsity().items():
                    record[name] = (
                        s_hat.mean().item(),
                        target[name],
                        self.lagrangian.lambda1[name].item(),
                        self.lagrangian.lambda2[name].item(),
                        lag_parts[name].item(),
                    )
                record["expected_params"] = l0.expected_num_params().item()


# --- the analysis of a profile ---------------------------------------------------------------------


def _is_range(e) -> bool:
    return e.name.startswith(RANGE) or e.name.startswith("ProfilerStep#")


def annotation_names(events: Sequence) -> set[str]:
    """Names of the record_function ranges (this script's, the optimizer's, ...): on CUDA each also
    appears on the device timeline as a `gpu_user_annotation` span, which is no kernel."""
    names = {e.name for e in events if getattr(e, "is_user_annotation", False) or _is_range(e)}
    return names | {e.name for e in events if e.device_type == DeviceType.CPU and _is_range(e)}


def _op_time_us(e, cuda: bool, annotations: set[str]) -> float:
    """Device time of the kernels `e` launched itself (CUDA), or its self CPU time (CPU)."""
    if cuda:
        return float(sum(k.duration for k in e.kernels if k.name not in annotations))
    return float(e.self_cpu_time_total)


def _ancestry(e) -> tuple[str | None, Any, list[str]]:
    """(innermost phase range, backward node or None, names of the ops from `e` up to the first range)."""
    names, node = [], None
    while e is not None:
        if _is_range(e):
            return e.name[len(RANGE) :], node, names
        names.append(e.name)
        if node is None and e.name.startswith(BACKWARD_NODE):
            node = e
        e = e.cpu_parent
    return None, node, names


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def analyse(events: Sequence, cuda: bool, steps: int, measured_s: Sequence[float]) -> dict[str, Any]:
    """Per-step ms by category (summing to the profiled step time) and by host phase."""
    step_ranges = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    if len(step_ranges) != steps:
        raise RuntimeError(f"expected {steps} profiled steps, found {len(step_ranges)} step ranges")
    windows = [(e.time_range.start, e.time_range.end) for e in step_ranges]
    step_us = sum(end - start for start, end in windows)
    annotations = annotation_names(events)

    def in_steps(t: float) -> bool:
        return any(start <= t <= end for start, end in windows)

    cpu_ops = [
        e
        for e in events
        if e.device_type == DeviceType.CPU and not _is_range(e) and in_steps(e.time_range.start)
    ]
    # the phase of each forward op's autograd sequence number: the last op that recorded it made the node
    seq_phase: dict[tuple[int, int], str | None] = {}
    for e in sorted(cpu_ops, key=lambda e: e.time_range.start):
        phase, node, _ = _ancestry(e)
        if e.sequence_nr >= 0 and node is None:
            seq_phase[(e.thread, e.sequence_nr)] = phase
    by_seq = {seq: phase for (_, seq), phase in seq_phase.items()}

    totals: dict[str, float] = collections.defaultdict(float)
    op_us = 0.0
    for e in cpu_ops:
        if cuda and getattr(e, "is_user_annotation", False):
            continue  # its "kernel" is its own span on the device timeline
        t = _op_time_us(e, cuda, annotations)
        if t == 0.0:
            continue
        phase, node, names = _ancestry(e)
        if node is not None:  # a backward op: the phase of the forward op that made its node
            key = (node.fwd_thread, node.sequence_nr)
            phase = seq_phase.get(key, by_seq.get(node.sequence_nr, BACKWARD))
            if phase == FORWARD:
                phase = BACKWARD
        category = PHASE_CATEGORY.get(phase)
        if category is None:  # the model's own forward and backward (and anything unranged)
            if any("attention" in n.lower() or "scaleddotproduct" in n.lower() for n in names):
                category = ATTENTION
            elif e.name in MATMUL_OPS:
                category = MATMUL
            else:
                category = ELEMENTWISE
        totals[category] += t
        op_us += t
    busy_us = None
    if cuda:  # every kernel of the steps, to check that each was attributed to the op that launched it
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in events
            if e.device_type != DeviceType.CPU
            and e.name not in annotations
            and not getattr(e, "is_user_annotation", False)
            and in_steps(e.time_range.start)
        ]
        kernel_us = sum(b - a for a, b in kernels)
        busy_us = _union_us(kernels)
        unattributed = kernel_us - op_us
        if abs(unattributed) > 1e-3 * max(kernel_us, 1.0):
            totals["kernels not attributed to an op"] += unattributed
            op_us = kernel_us
    gap = GAP_CUDA if cuda else GAP_CPU
    totals[gap] = step_us - op_us

    # host time of each phase range, exclusive of the ranges nested in it
    host: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.name.startswith(RANGE) and e.name != STEP:
            nested = sum(c.time_range.elapsed_us() for c in e.cpu_children if c.name.startswith(RANGE))
            host[e.name[len(RANGE) :]] += e.time_range.elapsed_us() - nested

    profiled_ms = step_us / steps / 1e3
    return {
        "profiled_step_ms": profiled_ms,
        "measured_step_ms": statistics.mean(measured_s) * 1e3,
        "categories_ms": {k: v / steps / 1e3 for k, v in totals.items()},
        "categories_pct": {k: 100 * v / step_us for k, v in totals.items()},
        "host_phases_ms": {k: v / steps / 1e3 for k, v in sorted(host.items(), key=lambda kv: -kv[1])},
        "gpu_busy_ms": None if busy_us is None else busy_us / steps / 1e3,
    }


def top_ops(
    averages, annotations: set[str], cuda: bool, steps: int, step_ms: float, n: int = 25
) -> list[dict[str, Any]]:
    """The ops with the most self device (CUDA) or self CPU time, per step (`key_averages()` rows)."""
    rows = []
    for avg in averages:
        if avg.key in annotations and (cuda or avg.key.startswith(RANGE)):
            continue
        if cuda and avg.device_type != DeviceType.CPU:
            continue  # the kernels themselves (listed by `top_kernels`)
        us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        if us > 0:
            rows.append({"name": avg.key, "calls_per_step": avg.count / steps, "self_ms": us / steps / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    for r in rows:
        r["pct"] = 100 * r["self_ms"] / step_ms
    return rows[:n]


def top_kernels(averages, annotations: set[str], steps: int, n: int = 15) -> list[dict[str, Any]]:
    """The kernels (and memory copies) with the most device time, per step."""
    rows = [
        {"name": avg.key, "calls_per_step": avg.count / steps, "ms": avg.self_device_time_total / steps / 1e3}
        for avg in averages
        if avg.device_type != DeviceType.CPU and avg.key not in annotations
    ]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


# --- running and printing --------------------------------------------------------------------------


def profile_kind(run: Run, pruning: bool, a: argparse.Namespace, out: Path | None) -> dict[str, Any]:
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    warmup = 1 if cuda else 0  # the profiler's own first step (CUPTI start-up) is not kept
    measured = []
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=warmup, active=a.steps, repeat=1) if warmup else None,
        record_shapes=True,
        with_stack=False,
    ) as prof:
        for i in range(warmup + a.steps):
            t = run.step(pruning, 1000 + i)
            if i >= warmup:
                measured.append(t)
            prof.step()
    events = prof.events()
    result = analyse(events, cuda, a.steps, measured)
    annotations, averages = annotation_names(events), prof.key_averages()
    result["top_ops"] = top_ops(averages, annotations, cuda, a.steps, result["profiled_step_ms"])
    if cuda:
        result["top_kernels"] = top_kernels(averages, annotations, a.steps)
    if out is not None:
        result["trace"] = export_trace(prof, out / f"trace_{'prune' if pruning else 'plain'}.json")
    return result


def export_trace(prof, path: Path) -> str:
    prof.export_chrome_trace(str(path))
    if path.stat().st_size <= TRACE_GZIP_BYTES:
        return path.name
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    path.unlink()
    return gz.name


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def report(result: dict[str, Any], device_type: str) -> None:
    kinds = result["kinds"]
    print(
        f"\n{result['shape']}: {result['params'] / 1e6:.1f}M parameters, {result['precision']}, "
        f"{result['accum']} x {result['micro_batch']} x {result['seq']} = {result['tokens']} tokens per step, "
        f"{result['steps']} steps of each kind timed and {result['steps']} profiled"
    )
    for kind in KINDS:
        k = kinds[kind]
        mfu = f", MFU {k['mfu']:.1%}" if "mfu" in k else ""
        print(
            f"{kind:>8} step: {k['wall_ms']:9.1f} ms unprofiled (median), {k['tokens_per_s']:10.0f} tokens/s"
            f"{mfu}; profiled {k['profiled_step_ms']:.1f} ms (perf_counter {k['measured_step_ms']:.1f} ms)"
        )
    ratio = kinds["pruning"]["wall_ms"] / kinds["plain"]["wall_ms"]
    print(f"pruning / plain step time: {ratio:.3f}")
    if device_type == "cuda":
        for kind in KINDS:
            k = kinds[kind]
            print(
                f"{kind:>8} step: kernels {k['kernel_ms']:.1f} ms (busy {k['gpu_busy_ms']:.1f} ms), so the GPU "
                f"idles {k['idle_unprofiled_ms']:.1f} ms ({k['idle_unprofiled_ms'] / k['wall_ms']:.0%}) of the "
                "unprofiled step"
            )
    unit = "self device" if device_type == "cuda" else "self CPU"
    for kind in KINDS:
        rows = [
            (r["name"][:70], f"{r['calls_per_step']:.0f}", f"{r['self_ms']:.2f}", f"{r['pct']:.1f}")
            for r in kinds[kind]["top_ops"]
        ]
        print_table(f"top ops of the {kind} step by {unit} time", rows, ("op", "calls", "ms", "%"))
    cats = [c for c in result["categories"] if any(c in kinds[k]["categories_ms"] for k in KINDS)]
    rows = []
    for c in cats:
        p, q = (kinds[k]["categories_ms"].get(c, 0.0) for k in KINDS)
        pp, qp = (kinds[k]["categories_pct"].get(c, 0.0) for k in KINDS)
        rows.append((c, f"{p:.1f}", f"{pp:.1f}", f"{q:.1f}", f"{qp:.1f}", f"{q - p:+.1f}"))
    total = [kinds[k]["profiled_step_ms"] for k in KINDS]
    rows.append(
        (
            "step (profiled)",
            f"{total[0]:.1f}",
            "100.0",
            f"{total[1]:.1f}",
            "100.0",
            f"{total[1] - total[0]:+.1f}",
        )
    )
    print_table(
        "where the time of a step goes (ms per step, profiled)",
        rows,
        ("category", "plain ms", "%", "pruning ms", "%", "pruning - plain ms"),
    )
    phases = sorted({p for k in KINDS for p in kinds[k]["host_phases_ms"]})
    rows = [
        (p, *(f"{kinds[k]['host_phases_ms'].get(p, 0.0):.1f}" for k in KINDS))
        for p in sorted(phases, key=lambda p: -kinds["pruning"]["host_phases_ms"].get(p, 0.0))
    ]
    print_table("host (CPU) time inside each range, ms per step", rows, ("range", "plain", "pruning"))
    if device_type == "cuda":
        for kind in KINDS:
            rows = [
                (r["name"][:90], f"{r['calls_per_step']:.0f}", f"{r['ms']:.2f}")
                for r in kinds[kind]["top_kernels"]
            ]
            print_table(f"top kernels of the {kind} step", rows, ("kernel", "calls", "ms"))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="1b")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model (seconds on a CPU)")
    parser.add_argument("--batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="steps of each kind timed, and as many profiled")
    parser.add_argument("--warmup", type=int, help="unmeasured steps of each kind first (CUDA 2, CPU 1)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="default: auto (tiny: fp32)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="for MFU (H100/H200: 989)"
    )
    parser.add_argument("--out", type=Path, help="write the chrome traces and profile.json here")
    a = parser.parse_args(argv)
    if a.tiny:
        a.shape = "tiny"
    batch, micro_batch, seq = DEFAULT_BATCH[a.shape]
    a.batch, a.micro_batch, a.seq = a.batch or batch, a.micro_batch or micro_batch, a.seq or seq
    a.precision = a.precision or ("fp32" if a.tiny else "auto")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.warmup is None:
        a.warmup = 2 if a.device == "cuda" else 1
    if a.batch % a.micro_batch:
        parser.error(f"--batch {a.batch} is not a multiple of --micro-batch {a.micro_batch}")
    if a.steps < 1:
        parser.error("--steps must be at least 1")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    print(f"machine: {machine_summary()}", flush=True)
    device = torch.device(a.device)
    run = Run(a, device)
    cuda = device.type == "cuda"
    for i in range(a.warmup):
        for pruning in (True, False):
            run.step(pruning, i)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(a.steps):
        for pruning in (True, False) if i % 2 == 0 else (False, True):
            times[pruning].append(run.step(pruning, a.warmup + i))
    out = a.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    flops = train_flops_per_token(run.args, a.seq) * run.tokens
    kinds = {}
    for kind in KINDS:
        pruning = kind == "pruning"
        k = profile_kind(run, pruning, a, out)
        wall = statistics.median(times[pruning])
        k.update(
            wall_ms=wall * 1e3, wall_ms_all=[t * 1e3 for t in times[pruning]], tokens_per_s=run.tokens / wall
        )
        if cuda:
            k["mfu"] = flops / wall / (a.peak_tflops * 1e12)
            kernel_ms = k["profiled_step_ms"] - k["categories_ms"][GAP_CUDA]
            k["kernel_ms"] = kernel_ms
            k["idle_unprofiled_ms"] = (
                k["wall_ms"] - kernel_ms
            )  # the kernels take as long without the profiler
        kinds[kind] = k
    cats = categories(device.type)
    extra = sorted({c for k in kinds.values() for c in k["categories_ms"]} - set(cats))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_summary(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": a.shape,
        "params": parameter_counts(run.args)["num_params"],
        "precision": run.precision.describe(),
        "batch": a.batch,
        "micro_batch": a.micro_batch,
        "accum": run.accum,
        "seq": a.seq,
        "tokens": run.tokens,
        "steps": a.steps,
        "warmup": a.warmup,
        "train_flops_per_step": flops,
        "peak_tflops": a.peak_tflops if cuda else None,
        "categories": cats + extra,
        "kinds": kinds,
        "pruning_minus_plain_ms": {
            c: kinds["pruning"]["categories_ms"].get(c, 0.0) - kinds["plain"]["categories_ms"].get(c, 0.0)
            for c in cats + extra
        },
    }
    report(result, device.type)
    if out is not None:
        (out / "profile.json").write_text(json.dumps(result, indent=1))
        print(
            f"\nwrote {out / 'profile.json'} and the traces {', '.join(k['trace'] for k in kinds.values())}"
        )
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
