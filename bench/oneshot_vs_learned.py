"""One-shot vs learned pruning of SmolLM2-135M to the demo target, on the sample corpus, in one run.

    .venv/bin/python bench/oneshot_vs_learned.py [--out runs/bench-oneshot] [--arms a,b,...]

Every arm prunes with `sheared prune` (configs/smollm2-135m/prune.yaml, its data and target:
24 layers / 512 / 4 heads in 2 KV groups / 1024), exports with `sheared export` (verified), and the
export is evaluated per domain on the held-out split (fp32). Arms:

- `random`, `magnitude`, `activation`: one-shot, no training;
- `activation-after-depth`: activation scores of widths measured after dropping layers;
- `l0-uniform`, `l0-activation`: the demo's learned-mask run (150 steps x 512 tokens) from
  uniform and from activation-ranked log_alpha;
- `activation+train`: the activation one-shot model continued (`sheared train`) on as many tokens
  as the l0 runs saw: learned masks against the ranking they start from, at equal tokens.

Finished arms are skipped on a re-run (their results.json is kept). Prints a table and writes
`OUT/results.json`; wall times are of the prune (and train) commands on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from sheared.config import load_config
from sheared.eval.evaluate import per_domain
from sheared.export import export_run
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.loop import run

PRUNE_CONFIG = "configs/smollm2-135m/prune.yaml"
TRAIN_CONFIG = "configs/smollm2-135m/train.yaml"
ARMS = {
    "random": ["pruning.method=random"],
    "magnitude": ["pruning.method=magnitude"],
    "activation": ["pruning.method=activation"],
    "activation-after-depth": ["pruning.method=activation", "pruning.width_scores=after_depth"],
    "l0-uniform": [],
    "l0-activation": ["pruning.init=activation"],
    "activation+train": None,  # continued from the `activation` arm's export
}


def _prune_arm(name: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config(PruneConfig, PRUNE_CONFIG, overrides)
    t0 = time.perf_counter()
    run(cfg, out / name / "run", resume=(out / name / "run").exists())
    seconds = time.perf_counter() - t0
    report = export_run(out / name / "run", out / name / "export", force=(out / name / "export").exists())
    steps = 0 if cfg.pruning.one_shot else cfg.train.steps
    tokens = steps * cfg.train.global_batch_size * (cfg.data.seq_len or 256)
    return {
        "seconds": seconds,
        "tokens_trained": tokens,
        "expected_minus_target_sparsity": report["expected_minus_target_sparsity"],
        "export": str(out / name / "export"),
    }


def _train_arm(out: Path, tokens: int) -> dict:
    base = load_config(TrainConfig, TRAIN_CONFIG, [f"model={out / 'activation' / 'export'}"])
    batch = load_config(PruneConfig, PRUNE_CONFIG).train.global_batch_size
    steps = tokens // (batch * 256)
    cfg = load_config(
        TrainConfig,
        TRAIN_CONFIG,
        [
            f"model={out / 'activation' / 'export'}",
            f"train.steps={steps}",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch}",
            f"train.save_interval={steps}",
            f"train.eval_interval={max(steps // 3, 1)}",
        ],
    )
    assert cfg.data.path == base.data.path
    t0 = time.perf_counter()
    run(cfg, out / "activation+train" / "run", resume=(out / "activation+train" / "run").exists())
    seconds = time.perf_counter() - t0
    target = out / "activation+train" / "export"
    export_run(out / "activation+train" / "run", target, force=target.exists())
    return {"seconds": seconds, "tokens_trained": steps * batch * 256, "export": str(target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-oneshot")
    parser.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS)
    )
    ns = parser.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_config(PruneConfig, PRUNE_CONFIG).data.path
    results = {}
    for name in ns.arms.split(","):
        done = out / name / "results.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            continue
        print(f"\n== {name}", flush=True)
        if ARMS[name] is None:
            l0_tokens = results.get("l0-activation", results.get("l0-uniform", {})).get(
                "tokens_trained", 76800
            )
            if "activation" not in results:
                results["activation"] = _prune_arm("activation", ARMS["activation"], out)
            result = _train_arm(out, l0_tokens)
            result["seconds"] += results["activation"]["seconds"]
        else:
            result = _prune_arm(name, ARMS[name], out)
        result["eval_loss"] = {d: v["loss"] for d, v in per_domain(result["export"], data, 8, None).items()}
        result["mean_eval_loss"] = sum(result["eval_loss"].values()) / len(result["eval_loss"])
        done.write_text(json.dumps(result, indent=2) + "\n")
        results[name] = result
    source = {d: v["loss"] for d, v in per_domain("smollm2-135m", data, 8, None).items()}
    (out / "results.json").write_text(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "source": source, "arms": results},
            indent=2,
        )
    )
    domains = list(source)
    print(
        f"\n{'arm':<24}{'tokens':>8}{'seconds':>9}" + "".join(f"{d[:8]:>9}" for d in domains) + f"{'mean':>8}"
    )
    print(
        f"{'source (unpruned)':<24}{'':>8}{'':>9}"
        + "".join(f"{source[d]:>9.3f}" for d in domains)
        + f"{sum(source.values()) / len(source):>8.3f}"
    )
    for name, r in results.items():
        row = "".join(f"{r['eval_loss'][d]:>9.3f}" for d in domains)
        print(f"{name:<24}{r['tokens_trained']:>8,}{r['seconds']:>9.0f}{row}{r['mean_eval_loss']:>8.3f}")
    for name, r in results.items():
        gap = r.get("expected_minus_target_sparsity") or {}
        if gap:
            print(
                f"{name}: expected minus target sparsity "
                + ", ".join(f"{k} {v:+.4f}" for k, v in gap.items())
            )
    best = min(results, key=lambda n: results[n]["mean_eval_loss"])
    print(
        f"lowest mean eval loss: {best} ({results[best]['mean_eval_loss']:.3f}; ppl {math.exp(results[best]['mean_eval_loss']):.1f})"
    )


if __name__ == "__main__":
    main()
