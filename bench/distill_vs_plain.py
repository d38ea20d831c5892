"""Continued pretraining of a pruned SmolLM2 with and without distillation from the source, same data order.

    .venv/bin/python bench/distill_vs_plain.py --pruned runs/bench-oneshot/activation/export \\
        [--steps 150] [--alpha 0.5] [--temperature 1.0] [--out runs/bench-distill]

Both runs use configs/smollm2-135m/train.yaml with a fixed domain mix (`data.dynamic=false`, so
the data order is the same in both), evaluate every `--eval-every` steps, and differ only in
`distill.teacher` (none / source). Prints held-out mean loss against tokens for both, and how many
tokens the distilled run needs to reach the plain run's final loss (goal: ≤ 50%). Finished runs are
kept and reused; the table goes to `OUT/results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sheared.config import load_config
from sheared.run_dir import EVAL_LOSS, read_metrics
from sheared.train.config import TrainConfig
from sheared.train.loop import run

TRAIN_CONFIG = "configs/smollm2-135m/train.yaml"


def _mean_eval(records: list[dict]) -> list[tuple[int, float]]:
    """(tokens, mean held-out loss over the domains) at every evaluation."""
    out = []
    for r in records:
        losses = [v for k, v in r.items() if k.startswith(EVAL_LOSS)]
        if losses:
            out.append((r["tokens"], sum(losses) / len(losses)))
    return out


def _run(name: str, ns: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(ns.out) / name
    overrides = [
        f"model={ns.pruned}",
        f"train.steps={ns.steps}",
        f"train.eval_interval={ns.eval_every}",
        f"train.save_interval={ns.steps}",
        "data.dynamic=false",
        *extra,
    ]
    cfg = load_config(TrainConfig, TRAIN_CONFIG, overrides)
    seconds = None
    if not (out / "checkpoints").is_dir() or len(read_metrics(out)) < ns.steps:
        t0 = time.perf_counter()
        run(cfg, out, resume=out.exists())
        seconds = time.perf_counter() - t0
    return {"curve": _mean_eval(read_metrics(out)), "seconds": seconds, "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", required=True, help="an exported pruned model (sheared export)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench-distill")
    ns = parser.parse_args()
    plain = _run("plain", ns, [])
    kd = _run(
        "kd",
        ns,
        ["distill.teacher=source", f"distill.alpha={ns.alpha}", f"distill.temperature={ns.temperature}"],
    )
    final = plain["curve"][-1][1]
    reached = next((tokens for tokens, loss in kd["curve"] if loss <= final), None)
    total = plain["curve"][-1][0]
    print(f"\n{'tokens':>9}{'plain':>9}{'KD':>9}")
    for (tokens, a), (_, b) in zip(plain["curve"], kd["curve"]):
        print(f"{tokens:>9,}{a:>9.3f}{b:>9.3f}")
    for name, r in (("plain", plain), ("KD", kd)):
        if r["seconds"]:
            print(f"{name}: {r['seconds']:.0f} s")
    if reached is None:
        print(f"KD did not reach the plain run's final mean loss {final:.3f} within {total:,} tokens")
    else:
        print(
            f"KD reached the plain run's final mean loss {final:.3f} after {reached:,} of {total:,} tokens ({reached / total:.0%})"
        )
    result = {
        "plain": plain,
        "kd": kd,
        "plain_final": final,
        "kd_tokens_to_plain_final": reached,
        "tokens": total,
    }
    (Path(ns.out) / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
