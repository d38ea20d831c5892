"""Our decoder vs `transformers`' for the same weights: step time, measured alternately in one process.

    .venv/bin/python bench/model_vs_hf.py [--source smollm2-135m] [--batch 4] [--seq 256] [--rounds 6]

For each round, both models run one forward+backward step and one forward-only pass on the same
batch, alternating which goes first; the machine's noise hits both alike. Prints the median times
and the ratio ours / transformers (goal: <= 1.00).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

from sheared.eval.loss import fused_loss, next_token_labels
from sheared.hardware import machine_summary
from sheared.model import load_source, save_hf


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()

    source = load_source(a.source, with_tokenizer=False)
    ours = source.model.train()
    with tempfile.TemporaryDirectory() as tmp:  # the same weights as a plain HF checkpoint
        save_hf(ours, tmp, base_config=source.hf_config)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()

    ids = torch.randint(0, ours.args.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))

    labels = next_token_labels(ids)

    def step_ours():  # the training loop's path: hidden states into the fused chunked loss
        ours(ids, head=lambda h, w: fused_loss(h, w, labels)).loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(ids, labels=ids).loss.backward()
        hf.zero_grad(set_to_none=True)

    def fwd_ours():
        with torch.no_grad():
            ours(ids)

    def fwd_hf():
        with torch.no_grad():
            hf(ids)

    times = {k: [] for k in ("step_ours", "step_hf", "fwd_ours", "fwd_hf")}
    for r in range(a.rounds + 1):
        pairs = [("ours", step_ours, fwd_ours), ("hf", step_hf, fwd_hf)]
        for name, step, fwd in pairs if r % 2 == 0 else reversed(pairs):
            t_step, t_fwd = _timed(step), _timed(fwd)
            if r > 0:  # round 0 warms up both
                times[f"step_{name}"].append(t_step)
                times[f"fwd_{name}"].append(t_fwd)

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.batch * a.seq
    print(f"machine: {machine_summary()}")
    print(
        f"source {a.source}, batch {a.batch} x {a.seq} tokens, fp32, {torch.get_num_threads()} threads, {a.rounds} rounds"
    )
    for kind in ("step", "fwd"):
        label = "forward+backward" if kind == "step" else "forward only    "
        o, h = med[f"{kind}_ours"], med[f"{kind}_hf"]
        print(
            f"{label}: ours {o * 1e3:8.1f} ms ({tokens / o:7.0f} tok/s)   transformers {h * 1e3:8.1f} ms "
            f"({tokens / h:7.0f} tok/s)   ratio ours/transformers {o / h:.3f}"
        )


if __name__ == "__main__":
    main()
