"""Peak memory and time of one training step: fused chunked loss vs full logits, CE and CE + KD.

    .venv/bin/python bench/loss_memory.py [--vocab 128256] [--seq 2048] [--rounds 3] [--chunk-size N]

The student is a small tied-embedding LLaMA (2 layers, hidden 256) with Llama 3's vocabulary; the
teacher is a wider frozen one (hidden 384) run under no_grad. One step = the student's forward,
the teacher's forward (KD variants), the loss and the backward, for batch 1 x seq tokens.
Time: medians over rounds, the four variants alternating (the order rotates every round) in this
process; there is no separate warm-up round (it would cost a fifth of the run), the median drops
the first round's one-off costs. Peak memory: on CUDA, max_memory_allocated in this process; on
CPU, each variant runs once in a fresh subprocess that reports its peak resident memory
(ru_maxrss) after the step minus its resident memory after building the models (torch's CPU
tensors are invisible to tracemalloc).
Goals: fused CE peak / unfused CE peak <= 0.5; fused KD step time / fused CE step time <= 1.4.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sheared.eval.loss import default_chunk_size, fused_loss, next_token_labels, unfused_loss
from sheared.model import CausalLM, ModelArgs

VARIANTS = ("unfused CE", "fused CE", "unfused CE+KD", "fused CE+KD")
ALPHA = 0.5  # an even mix, so both gradient terms are computed
TEMPERATURE = 2.0  # != 1, so the KD term has its own softmax (the general, slower path)
STUDENT_HIDDEN, TEACHER_HIDDEN = 256, 384
GOAL_PEAK_RATIO = 0.5
GOAL_KD_TIME_RATIO = 1.4
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
KIB = 1024


def model_args(vocab: int, hidden: int) -> ModelArgs:
    """A 2-layer tied LLaMA of width `hidden` (head_dim 64, 2 KV groups)."""
    heads = hidden // 64
    return ModelArgs(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    )


def build(vocab: int, seq: int, device: torch.device) -> tuple[CausalLM, CausalLM, torch.Tensor]:
    """Student, frozen teacher and token ids (1, seq), seeded."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = (
        CausalLM(model_args(vocab, STUDENT_HIDDEN)),
        CausalLM(model_args(vocab, TEACHER_HIDDEN)),
    )
    student.init_weights(generator)
    teacher.init_weights(generator)
    ids = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    return student.to(device), teacher.to(device).eval().requires_grad_(False), ids


def make_step(variant: str, student: CausalLM, teacher: CausalLM, ids: torch.Tensor, chunk_size: int | None):
    """One training step of `variant` as a function returning the loss value."""
    fn = fused_loss if variant.startswith("fused") else unfused_loss
    labels = next_token_labels(ids)  # (1, T)

    def step() -> float:
        student.zero_grad(set_to_none=True)
        distil = {}
        if variant.endswith("KD"):
            with torch.no_grad():
                teacher_hidden = teacher.hidden_states(ids)  # (1, T, d_t)
            distil = dict(
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher.output_weight,
                alpha=ALPHA,
                temperature=TEMPERATURE,
            )
        parts = fn(student.hidden_states(ids), student.output_weight, labels, **distil, chunk_size=chunk_size)
        parts.loss.backward()
        return parts.loss.item()

    return step


def peak_mib_cpu(variant: str, args: argparse.Namespace) -> float:
    """Peak RSS growth (MiB) of one step of `variant`, in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--measure",
        variant,
        "--vocab",
        str(args.vocab),
        "--seq",
        str(args.seq),
    ]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure_in_this_process(variant: str, args: argparse.Namespace) -> None:
    """The subprocess side of `peak_mib_cpu`: prints {"peak_mib": ...}."""
    student, teacher, ids = build(args.vocab, args.seq, torch.device("cpu"))
    baseline = resident_kib()
    make_step(variant, student, teacher, ids, args.chunk_size)()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_mib": (peak - baseline) / KIB}))


def resident_kib() -> int:
    """Resident memory now (KiB); not ru_maxrss, which would keep a transient peak of model building."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_mib_cuda(step: Callable[[], float]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / KIB**2


def timed_ms(step: Callable[[], float], device: torch.device) -> tuple[float, float, float]:
    """(wall milliseconds, this process's CPU milliseconds, loss) of one step.

    CPU time (all threads, user + system) is less inflated than wall time when other processes
    share the cores; on CUDA only the wall time means anything.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = step()  # .item() inside waits for the device
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3, loss


def machine() -> str:
    """CPU model, the flags that matter for the matmuls, torch's threads (and the GPU if any)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    )
    said = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"CPU {model!r}, {said}, torch threads {torch.get_num_threads()}, torch {torch.__version__}{gpu}"


def load_average() -> str:
    """The 1-minute load average: other work on the machine slows every variant, and not evenly."""
    return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the four variants")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: by vocab)")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess's job
    args = parser.parse_args()
    if args.measure is not None:
        measure_in_this_process(args.measure, args)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunk = default_chunk_size(args.vocab) if args.chunk_size is None else args.chunk_size
    print(machine())
    print(f"load average at start: {load_average()}")
    print(
        f"batch 1 x {args.seq} tokens, vocab {args.vocab}, chunk {chunk} rows, alpha {ALPHA}, tau {TEMPERATURE}"
    )

    student, teacher, ids = build(args.vocab, args.seq, device)
    steps = {v: make_step(v, student, teacher, ids, args.chunk_size) for v in VARIANTS}
    if device.type == "cuda":
        peaks = {v: peak_mib_cuda(steps[v]) for v in VARIANTS}
    else:
        peaks = {v: peak_mib_cpu(v, args) for v in VARIANTS}
    losses: dict[str, float] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            ms, cpu_ms, losses[v] = timed_ms(steps[v], device)
            times[v].append(ms)
            cpu_times[v].append(cpu_ms)
    median = {v: statistics.median(times[v]) for v in VARIANTS}
    cpu = {v: statistics.median(cpu_times[v]) for v in VARIANTS}
    print(f"load average at end: {load_average()}")

    print(
        f"\n| variant | peak memory (MiB) | step time (ms, median of {args.rounds}) | min–max (ms) "
        "| CPU time (ms, median) | loss |"
    )
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        spread = f"{min(times[v]):.0f}–{max(times[v]):.0f}"
        print(f"| {v} | {peaks[v]:.0f} | {median[v]:.0f} | {spread} | {cpu[v]:.0f} | {losses[v]:.4f} |")
    print()
    ratio("fused CE peak / unfused CE peak", peaks["fused CE"], peaks["unfused CE"], GOAL_PEAK_RATIO)
    ratio("fused KD peak / unfused KD peak", peaks["fused CE+KD"], peaks["unfused CE+KD"])
    ratio("fused KD time / fused CE time", median["fused CE+KD"], median["fused CE"], GOAL_KD_TIME_RATIO)
    ratio("  the same in CPU time", cpu["fused CE+KD"], cpu["fused CE"], GOAL_KD_TIME_RATIO)
    ratio("unfused KD time / unfused CE time", median["unfused CE+KD"], median["unfused CE"])
    ratio("fused CE time / unfused CE time", median["fused CE"], median["unfused CE"])
    ratio("fused KD time / unfused KD time", median["fused CE+KD"], median["unfused CE+KD"])


def ratio(name: str, a: float, b: float, goal: float | None = None) -> None:
    said = "" if goal is None else f"  (goal <= {goal}: {'met' if a / b <= goal else 'missed'})"
    print(f"{name + ':':36s}{a / b:.3f}{said}")


if __name__ == "__main__":
    main()
