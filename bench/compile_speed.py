"""Step time with `train.compile` (torch.compile of every decoder layer) against eager, for a
pruning step and a plain training step of a SmolLM2-135M-shaped model.

    .venv/bin/python bench/compile_speed.py [--precision fp32|bf16] [--batch 4] [--seq 256] [--rounds 4]

Two copies of the model (same random weights) are built; the layers of one are compiled in place
exactly as the loop does (`layer.compile()`). Steps are the ones of `bench/prune_overhead.py`
(forward, fused loss, backward, clipping, AdamW; with sampled masks, L0 and the Lagrangian for
pruning). After warm-up steps (which include compilation, timed separately), the eager and
compiled steps alternate; medians over rounds. The loss of the first step is compared too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from prune_overhead import build, make_step

from sheared.hardware import machine_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    ns = parser.parse_args()
    device, bf16 = torch.device("cpu"), ns.precision == "bf16"
    print(f"machine: {machine_summary()}")
    for masked in (False, True):
        variants = {}
        for compiled in (False, True):
            model, l0, lagrangian, optimizer = build(device)
            if compiled:
                for layer in model.model.layers:
                    layer.compile()
            ids = torch.randint(
                0, model.args.vocab_size, (ns.batch, ns.seq), generator=torch.Generator().manual_seed(1)
            )
            variants[compiled] = make_step(masked, model, l0, lagrangian, optimizer, ids, bf16)
        warm = {}
        for compiled, step in variants.items():
            t0 = time.perf_counter()
            step(0)
            step(1)  # a second call: recompilation for the changed requires_grad/shapes shows here
            warm[compiled] = time.perf_counter() - t0
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(ns.rounds):
            for compiled in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                variants[compiled](2 + r)
                times[compiled].append(time.perf_counter() - t0)
        eager, comp = statistics.median(times[False]), statistics.median(times[True])
        label = "pruning" if masked else "plain"
        print(
            f"{label:>8} step, {ns.precision}, {ns.batch} x {ns.seq}: eager {eager * 1e3:.0f} ms, compiled {comp * 1e3:.0f} ms "
            f"-> compiled / eager {comp / eager:.3f}; first two steps (incl. compilation) {warm[False]:.0f} s vs {warm[True]:.0f} s"
        )


if __name__ == "__main__":
    main()
