"""Speed-up of the exported default-target model over its source, measured in turns in one run.

    .venv/bin/python bench/export_speedup.py [--pruned DIR] [--dtype float32] [--rounds 5] [--threads 1]

Without --pruned, the default target of configs/smollm2-135m/prune.yaml is exported from
SmolLM2-135M with random exact-target masks (speed does not depend on which structures are kept).
Both models run as plain transformers models with the same settings: forward passes of
batch x seq_len tokens and greedy generation of new tokens, alternating which goes first, with
one torch thread unless --threads says otherwise (the setting `sheared eval --throughput` and the
demo use). The speed-up is the median over rounds of pruned / source tokens/s in the same round.
The goal: speed-up >= 80% of the ratio of non-embedding FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from sheared.config import load_config
from sheared.eval.throughput import ThroughputSettings, load_hf_model, measure_throughput
from sheared.hardware import machine_summary
from sheared.model import load_source
from sheared.model.args import ModelArgs, parameter_counts
from sheared.precision import torch_dtype
from sheared.train.config import PruneConfig

GOAL_FRACTION = 0.8


def flops_per_token(args: ModelArgs, context: int) -> float:
    """Non-embedding forward FLOPs per token: 2 x non-embedding weights (matrix multiplies), plus
    attention scores and values at an average causal context of context / 2."""
    weights = parameter_counts(args)["num_params_non_embedding"]
    attention = 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * (context / 2)
    return 2 * weights + attention


def lm_head_flops_per_token(args: ModelArgs) -> float:
    """The output projection's FLOPs per token: excluded from the goal, but part of the runtime."""
    return 2 * args.hidden_size * args.vocab_size


def _args_of(model) -> ModelArgs:
    from sheared.model.families import args_from_hf_config

    return args_from_hf_config(model.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument(
        "--config", default="configs/smollm2-135m/prune.yaml", help="where the default target comes from"
    )
    parser.add_argument(
        "--pruned", default=None, help="an exported model (default: export one with random masks)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=ThroughputSettings.threads, help="torch threads while measuring"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    a = parser.parse_args()
    transformers.logging.set_verbosity_error()
    dtype = torch_dtype(a.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        pruned_dir = a.pruned
        if pruned_dir is None:
            from sheared.export import export_model
            from sheared.pruning import L0Module

            source = load_source(a.source)
            target = load_config(PruneConfig, a.config).pruning.target
            l0 = L0Module(source.args, target)
            with torch.no_grad():
                for p in l0.log_alpha.values():
                    p.normal_(generator=torch.Generator().manual_seed(0))
            ids = source.tokenizer(["It is a truth universally acknowledged."], return_tensors="pt").input_ids
            pruned_dir = Path(tmp) / "pruned"
            export_model(source.model, l0.deterministic("target"), pruned_dir, source=source, ids=ids)
            del source
        models = {"source": load_hf_model(a.source, dtype), "pruned": load_hf_model(pruned_dir, dtype)}
        settings = ThroughputSettings(
            batch_size=a.batch,
            seq_len=a.seq,
            new_tokens=a.new_tokens,
            rounds=a.rounds,
            dtype=a.dtype,
            threads=a.threads,
        )
        start = time.perf_counter()
        results = measure_throughput(models, settings, vocab_size=models["source"].config.vocab_size)
        measured_s = time.perf_counter() - start

    src_args, pruned_args = _args_of(models["source"]), _args_of(models["pruned"])
    flops_ratio = flops_per_token(src_args, a.seq) / flops_per_token(pruned_args, a.seq)
    pruned = results["pruned"]
    forward, generate = pruned["forward_vs_first"], pruned["generate_vs_first"]  # paired per round
    goal = GOAL_FRACTION * flops_ratio
    print(f"machine: {machine_summary()}")
    print(
        f"source {a.source}: {src_args.num_hidden_layers} layers / {src_args.hidden_size} / {src_args.num_attention_heads} heads "
        f"({src_args.num_key_value_heads} KV) / {src_args.intermediate_size}"
    )
    print(
        f"pruned: {pruned_args.num_hidden_layers} layers / {pruned_args.hidden_size} / {pruned_args.num_attention_heads} heads "
        f"({pruned_args.num_key_value_heads} KV) / {pruned_args.intermediate_size}"
    )
    print(
        f"{a.dtype}, measured with {settings.threads} torch thread(s), forward {a.batch} x {a.seq}, generate "
        f"{a.new_tokens} new tokens x {a.batch}, median (min-max) of {a.rounds} rounds in turns, "
        f"measured in {measured_s:.1f} s"
    )
    for name in ("source", "pruned"):
        r = results[name]
        print(
            f"  {name:<7} forward {r['forward_tokens_per_s']:6.0f} ({r['forward_tokens_per_s_min']:.0f}-"
            f"{r['forward_tokens_per_s_max']:.0f}) tok/s   generate {r['generate_tokens_per_s']:6.1f} "
            f"({r['generate_tokens_per_s_min']:.1f}-{r['generate_tokens_per_s_max']:.1f}) tok/s"
        )
    total_ratio = (flops_per_token(src_args, a.seq) + lm_head_flops_per_token(src_args)) / (
        flops_per_token(pruned_args, a.seq) + lm_head_flops_per_token(pruned_args)
    )
    print(
        f"non-embedding FLOPs per token, source / pruned: {flops_ratio:.2f}x (goal: speed-up >= {goal:.2f}x)"
    )
    print(f"all FLOPs per token, output projection included: {total_ratio:.2f}x")
    for p, speedup in (("forward", forward), ("generate", generate)):
        low, high = pruned[f"{p}_vs_first_min"], pruned[f"{p}_vs_first_max"]
        print(
            f"speed-up {p:<8} {speedup:.2f}x ({low:.2f}-{high:.2f}x over rounds) = {speedup / flops_ratio:.0%} "
            f"of the FLOPs ratio  {'meets' if speedup >= goal else 'misses'} the goal"
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "flops_ratio": flops_ratio,
                    "forward_speedup": forward,
                    "generate_speedup": generate,
                    "measured_s": measured_s,
                    "total_flops_ratio": total_ratio,
                    "settings": vars(settings),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
