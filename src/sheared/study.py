"""`sheared study`: learned vs one-shot pruning, distillation and dynamic batch loading, at equal tokens.

For one source, one target and one token budget per arm (calibration, pruning and continued
pretraining all count against it), every arm ends in an exported model of the exact target shape,
made by the same code as `sheared prune` / `train` / `export` / `eval`:

| arm                 | how                                                                         |
|---------------------|-----------------------------------------------------------------------------|
| `scratch`           | random init of the target shape, trained on the whole budget (RQ1)          |
| `random`, `magnitude`, `activation` | one-shot, then continued pretraining on the rest        |
| `l0-uniform`, `l0-activation` | learned masks on `prune_fraction` of the budget, then continued |
| `best+distill`      | the best pruned arm again, distilling from the source in every training run |
| `best-fixed-mix`    | the best arm again with a fixed domain mix instead of dynamic batch loading (RQ3) |

Each arm writes its runs and exports under `OUT/<arm>/` and `OUT/<arm>/result.json`; a re-run skips
arms that finished and resumes the others. `OUT/results.json`, `OUT/results.md` and the figures
(`loss_vs_tokens.png`, `domain_losses.png`, `domain_weights.png`) summarise all arms.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.files import atomic_write_json, atomic_write_text, publish_dir
from sheared.hardware import machine_summary
from sheared.model import DEFAULT_SOURCE, load_source
from sheared.model.args import describe
from sheared.pipeline import (
    RunConfig,
    continue_and_export,
    prune_and_export,
    with_data,
    with_distill,
    with_loop,
    with_lr,
    with_pruning,
    with_steps,
)
from sheared.pruning.target import TargetShape
from sheared.report.study import study_figures

if TYPE_CHECKING:
    from sheared.train.config import PruneConfig, TrainConfig

ARMS = (
    "scratch",
    "random",
    "magnitude",
    "activation",
    "l0-uniform",
    "l0-activation",
    "best+distill",
    "best-fixed-mix",
)
PRUNED_ARMS = ("random", "magnitude", "activation", "l0-uniform", "l0-activation")
ONE_SHOT = {"random": "random", "magnitude": "magnitude", "activation": "activation"}
L0_INIT = {"l0-uniform": "uniform", "l0-activation": "activation"}


@dataclass
class StudyConfig:
    """One study: a source, a target, a token budget per arm, and the arms."""

    target: TargetShape
    """Exact shape every arm ends in."""
    budget_tokens: int
    """Training tokens per arm: calibration + pruning + continued pretraining."""
    source: str = DEFAULT_SOURCE
    """Source model."""
    data: str = "data/prepared/smollm2-135m"
    """Prepared data (`sheared data prepare`; the demo makes it)."""
    prune_config: str = "configs/smollm2-135m/prune.yaml"
    """Template of the pruning runs (source, data, target, steps and methods are set per arm)."""
    train_config: str = "configs/smollm2-135m/train.yaml"
    """Template of the continued-pretraining runs (model, data and steps are set per arm)."""
    global_batch_size: int = 4
    """Sequences per step of every run."""
    prune_fraction: float = 0.5
    """Share of the budget the l0 arms spend learning masks (the rest is continued pretraining)."""
    evaluations: int = 5
    """Held-out evaluations along each training run (and at its end)."""
    scratch_lr: float = 1e-3
    """Peak learning rate of the from-scratch arm (the pruned arms keep the train config's)."""
    distill_alpha: float = 0.5
    """α of the distillation arm."""
    distill_temperature: float = 1.0
    """τ of the distillation arm."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Which arms to run, in order (`best+distill` and `best-fixed-mix` after the pruned arms)."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks to run on every final model (local task YAMLs in `include_path`)."""
    include_path: str | None = None
    """Folder of local lm-eval task YAMLs."""
    seed: int = 0
    """Seed of every run and of the random init."""

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UserError(f"unknown study arm {unknown[0]!r}; valid arms: {', '.join(ARMS)}")
        if self.budget_tokens < 1 or self.global_batch_size < 1 or self.evaluations < 1:
            raise UserError("budget_tokens, global_batch_size and evaluations must be positive")
        if not 0 < self.prune_fraction < 1:
            raise UserError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")


@dataclass
class Arm:
    """What one arm runs: a pruning run (or none), then a continued-pretraining run."""

    name: str
    method: str | None
    """`pruning.method` of the pruning run (`l0` or a one-shot method); None: the scratch arm, which
    starts from a random model of the target shape instead."""
    train_steps: int
    """Steps of the continued-pretraining run."""
    init: str = "uniform"
    """`pruning.init` of an l0 arm."""
    prune_steps: int = 0
    calibration_tokens: int = 0
    distill: bool = False
    """Distil from the source in every training run of the arm."""
    dynamic: bool = True
    """Dynamic batch loading (False: the fixed initial mix)."""
    lr: float | None = None
    """Peak learning rate of the continued-pretraining run (None: the train config's)."""


def _steps(tokens: int, cfg: StudyConfig, seq_len: int) -> int:
    return max(1, tokens // (cfg.global_batch_size * seq_len))


def plan_arm(name: str, cfg: StudyConfig, seq_len: int, num_domains: int, best: str | None) -> Arm:
    """The runs of one arm within the budget (`best`: the best pruned arm, for the two last arms)."""
    base = name
    variant: dict[str, Any] = {}
    if name in ("best+distill", "best-fixed-mix"):
        if best is None:
            raise UserError(f"arm {name} needs at least one pruned arm to have finished first")
        base = best
        variant = {"distill": True} if name == "best+distill" else {"dynamic": False}
    calibration = (
        calibration_tokens(cfg, num_domains, seq_len) if base in ("activation", "l0-activation") else 0
    )
    budget = cfg.budget_tokens - calibration
    if base == "scratch":
        return Arm(name, None, _steps(budget, cfg, seq_len), lr=cfg.scratch_lr, **variant)
    if base in ONE_SHOT:
        return Arm(
            name, ONE_SHOT[base], _steps(budget, cfg, seq_len), calibration_tokens=calibration, **variant
        )
    prune_steps = _steps(round(budget * cfg.prune_fraction), cfg, seq_len)
    train_steps = _steps(budget - prune_steps * cfg.global_batch_size * seq_len, cfg, seq_len)
    return Arm(
        name,
        "l0",
        train_steps,
        init=L0_INIT[base],
        prune_steps=prune_steps,
        calibration_tokens=calibration,
        **variant,
    )


def calibration_tokens(cfg: StudyConfig, num_domains: int, seq_len: int) -> int:
    """Tokens the activation calibration reads (they count against the budget)."""
    from sheared.train.config import PruneConfig

    return load_config(PruneConfig, cfg.prune_config).pruning.calibration * num_domains * seq_len


def _common(cfg: StudyConfig, run_cfg: RunConfig, arm: Arm) -> RunConfig:
    """What every run of the study shares: the data, the batch, the seed, and the arm's variant."""
    run_cfg = with_data(run_cfg, cfg.data, **({} if arm.dynamic else {"dynamic": False}))
    run_cfg = with_loop(
        run_cfg,
        global_batch_size=cfg.global_batch_size,
        micro_batch_size=cfg.global_batch_size,
        seed=cfg.seed,
    )
    if arm.distill:
        run_cfg = with_distill(run_cfg, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature)
    return run_cfg


def prune_config(arm: Arm, cfg: StudyConfig) -> PruneConfig:
    """The arm's pruning run, from the study's pruning template."""
    from sheared.train.config import PruneConfig

    template = load_config(PruneConfig, cfg.prune_config)
    run_cfg = dataclasses.replace(_common(cfg, template, arm), source=cfg.source, source_init=None)
    run_cfg = with_pruning(run_cfg, target=cfg.target, method=arm.method, init=arm.init)
    if arm.method == "l0":  # one checkpoint, at the end (what export reads)
        run_cfg = with_steps(run_cfg, arm.prune_steps, cfg.evaluations)
    return run_cfg


def train_config(arm: Arm, cfg: StudyConfig, start: Path) -> TrainConfig:
    """The arm's continued-pretraining run of the model at `start`, from the study's train template."""
    from sheared.train.config import TrainConfig

    template = load_config(TrainConfig, cfg.train_config)
    run_cfg = _common(cfg, dataclasses.replace(template, model=str(start)), arm)
    run_cfg = with_steps(run_cfg, arm.train_steps, cfg.evaluations)
    return run_cfg if arm.lr is None else with_lr(run_cfg, arm.lr)


# --- running one arm ---------------------------------------------------------------------------------


def _random_target_model(cfg: StudyConfig, out: Path) -> Path:
    """A random-init model of the target shape (the source's family and tokenizer) for the scratch arm."""
    from sheared.model import CausalLM, save_hf

    if (out / "config.json").is_file():
        return out
    source = load_source(cfg.source)
    args = cfg.target.model_args(source.args)
    model = CausalLM(args)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    with publish_dir(out) as tmp:
        save_hf(model, tmp, tokenizer=source.tokenizer, base_config=source.hf_config)
    return out


def run_arm(arm: Arm, cfg: StudyConfig, out: Path) -> dict[str, Any]:
    """Prune (or make the random model), export, continue, export, evaluate; the arm's result."""
    from sheared.eval.evaluate import per_domain

    t0 = time.perf_counter()
    if arm.method is None:
        start = _random_target_model(cfg, out / "random-init")
    else:
        start = prune_and_export(prune_config(arm, cfg), out / "prune", out / "pruned")
    prune_seconds = time.perf_counter() - t0
    train_cfg = train_config(arm, cfg, start)
    t1 = time.perf_counter()
    final = continue_and_export(train_cfg, out / "train", out / "final")
    train_seconds = time.perf_counter() - t1
    losses = {d: v["loss"] for d, v in per_domain(str(final), cfg.data, 8, None).items()}
    tokens = arm.calibration_tokens + (
        arm.prune_steps + train_cfg.train.steps
    ) * cfg.global_batch_size * _seq_len(cfg)
    result = {
        "arm": arm.name,
        "tokens": tokens,
        "calibration_tokens": arm.calibration_tokens,
        "prune_steps": arm.prune_steps,
        "train_steps": train_cfg.train.steps,
        "seconds": {"prune": prune_seconds, "train": train_seconds, "total": time.perf_counter() - t0},
        "eval_loss": losses,
        "mean_eval_loss": sum(losses.values()) / len(losses),
        "curve": _curve(out, arm),
        "export": str(final),
    }
    if cfg.tasks:
        from sheared.eval.harness import run_lm_eval

        result["tasks"] = run_lm_eval(str(final), cfg.tasks, include_path=cfg.include_path)
    return result


def _seq_len(cfg: StudyConfig) -> int:
    from sheared.data.tokens import read_metadata

    return int(read_metadata(cfg.data)["seq_len"])


def _curve(out: Path, arm: Arm) -> list[dict[str, Any]]:
    """Held-out loss along the way: (tokens so far in the arm, mean and per-domain eval loss)."""
    from sheared.run_dir import EVAL_LOSS, RunDir

    points = []
    offset = arm.calibration_tokens
    for run_name in ("prune", "train"):
        records = RunDir(out / run_name).read_metrics()
        for r in records:
            losses = {k[len(EVAL_LOSS) :]: v for k, v in r.items() if k.startswith(EVAL_LOSS)}
            if losses and r["step"] > 0:
                points.append({"tokens": offset + r["tokens"], "run": run_name, "eval_loss": losses})
        if records and run_name == "prune" and arm.prune_steps:
            offset += records[-1]["tokens"]
    return points


# --- the study -----------------------------------------------------------------------------------------


def run_study(cfg: StudyConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or finish) every arm, then write results.json, results.md and the figures."""
    from sheared.data.tokens import PreparedData

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data = PreparedData.open(cfg.data, verify="size")
    seq_len, domains = data.seq_len, data.domains
    reference = _source_losses(cfg, out)
    results: dict[str, Any] = {}
    for name in cfg.arms:
        done = out / name / "result.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            print(f"== {name}: done before (mean held-out loss {results[name]['mean_eval_loss']:.3f})")
            continue
        pruned = {n: r for n, r in results.items() if n in PRUNED_ARMS}
        best = min(pruned, key=lambda n: pruned[n]["mean_eval_loss"]) if pruned else None
        arm = plan_arm(name, cfg, seq_len, len(domains), best)
        print(
            f"\n== {name}" + (f" (the best pruned arm: {best})" if name.startswith("best") else ""),
            flush=True,
        )
        result = run_arm(arm, cfg, out / name)
        if name.startswith("best"):
            result["base"] = best
        result["worst_excess"] = max(result["eval_loss"][d] - reference[d] for d in domains)
        atomic_write_json(done, result)
        results[name] = result
    summary = {
        "machine": machine_summary(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "source": cfg.source,
        "target": describe(cfg.target),
        "budget_tokens": cfg.budget_tokens,
        "source_eval_loss": reference,
        "arms": results,
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", results_markdown(summary))
    study_figures(summary, out)
    print("\n" + results_markdown(summary))
    return summary


def _source_losses(cfg: StudyConfig, out: Path) -> dict[str, float]:
    from sheared.eval.evaluate import per_domain

    path = out / "source_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    losses = {d: v["loss"] for d, v in per_domain(cfg.source, cfg.data, 8, None).items()}
    atomic_write_json(path, losses)
    return losses


def results_markdown(summary: dict[str, Any]) -> str:
    """The study's table: per arm, tokens, wall time, per-domain and mean held-out loss, worst excess."""
    source = summary["source_eval_loss"]
    domains = list(source)
    head = "| arm | tokens | minutes | tokens/s | " + " | ".join(domains) + " | mean | worst excess |"
    lines = [
        f"Source `{summary['source']}` → {summary['target']}; budget {summary['budget_tokens']:,} tokens per arm.",
        "",
        head,
        "|" + "---|" * (len(domains) + 6),
        "| source (unpruned) | – | – | – | "
        + " | ".join(f"{source[d]:.3f}" for d in domains)
        + f" | {sum(source.values()) / len(source):.3f} | – |",
    ]
    for name, r in summary["arms"].items():
        seconds = r["seconds"]["total"]
        label = f"{name} ({r['base']})" if "base" in r else name
        lines.append(
            f"| {label} | {r['tokens']:,} | {seconds / 60:.1f} | {r['tokens'] / seconds:.0f} | "
            + " | ".join(f"{r['eval_loss'][d]:.3f}" for d in domains)
            + f" | {r['mean_eval_loss']:.3f} | {r['worst_excess']:+.3f} |"
        )
    return "\n".join(lines) + "\n"
