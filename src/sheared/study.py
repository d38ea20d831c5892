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

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.files import atomic_write_json, atomic_write_text, publish_dir
from sheared.hardware import machine_summary
from sheared.model import DEFAULT_SOURCE, load_source
from sheared.model.args import describe
from sheared.pruning.target import TargetShape

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
    prune: list[str] | None
    """Overrides of the pruning run (None: the scratch arm, which has none)."""
    train: list[str]
    """Overrides of the continued-pretraining run (its model is set by the study)."""
    prune_steps: int = 0
    calibration_tokens: int = 0


def _steps(tokens: int, cfg: StudyConfig, seq_len: int) -> int:
    return max(1, tokens // (cfg.global_batch_size * seq_len))


def _interval(steps: int, cfg: StudyConfig) -> int:
    return max(1, math.ceil(steps / cfg.evaluations))


def plan_arm(name: str, cfg: StudyConfig, seq_len: int, num_domains: int, best: str | None) -> Arm:
    """The runs of one arm within the budget (`best`: the best pruned arm, for the two last arms)."""
    base = name
    extra_prune: list[str] = []
    extra_train: list[str] = []
    if name in ("best+distill", "best-fixed-mix"):
        if best is None:
            raise UserError(f"arm {name} needs at least one pruned arm to have finished first")
        base = best
        distill = ["distill.teacher=source", f"distill.alpha={cfg.distill_alpha}"]
        distill.append(f"distill.temperature={cfg.distill_temperature}")
        extra = distill if name == "best+distill" else ["data.dynamic=false"]
        extra_prune, extra_train = list(extra), list(extra)  # `source`: the source, also for the export
    calibration = (
        calibration_tokens(cfg, num_domains, seq_len) if base in ("activation", "l0-activation") else 0
    )
    budget = cfg.budget_tokens - calibration
    if base == "scratch":
        train_steps = _steps(budget, cfg, seq_len)
        train = [f"optim.lr={cfg.scratch_lr}", *extra_train]
        return Arm(name, None, _train_overrides(train_steps, cfg, train), 0, 0)
    if base in ONE_SHOT:
        prune = [f"pruning.method={ONE_SHOT[base]}", *extra_prune]
        return Arm(
            name, prune, _train_overrides(_steps(budget, cfg, seq_len), cfg, extra_train), 0, calibration
        )
    prune_steps = _steps(round(budget * cfg.prune_fraction), cfg, seq_len)
    train_steps = _steps(budget - prune_steps * cfg.global_batch_size * seq_len, cfg, seq_len)
    prune = [
        f"pruning.init={L0_INIT[base]}",
        f"train.steps={prune_steps}",
        f"train.eval_interval={_interval(prune_steps, cfg)}",
        f"train.save_interval={prune_steps}",
        *extra_prune,
    ]
    return Arm(name, prune, _train_overrides(train_steps, cfg, extra_train), prune_steps, calibration)


def _train_overrides(steps: int, cfg: StudyConfig, extra: list[str]) -> list[str]:
    return [
        f"train.steps={steps}",
        f"train.eval_interval={_interval(steps, cfg)}",
        f"train.save_interval={steps}",
        *extra,
    ]


def calibration_tokens(cfg: StudyConfig, num_domains: int, seq_len: int) -> int:
    """Tokens the activation calibration reads (they count against the budget)."""
    from sheared.train.config import PruneConfig

    return load_config(PruneConfig, cfg.prune_config).pruning.calibration * num_domains * seq_len


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


def _common(cfg: StudyConfig) -> list[str]:
    return [
        f"data.path={cfg.data}",
        "data.auto_prepare=null",
        f"train.global_batch_size={cfg.global_batch_size}",
        f"train.micro_batch_size={cfg.global_batch_size}",
        f"train.seed={cfg.seed}",
    ]


def run_arm(arm: Arm, cfg: StudyConfig, out: Path) -> dict[str, Any]:
    """Prune (or make the random model), export, continue, export, evaluate; the arm's result."""
    from sheared.eval.evaluate import per_domain
    from sheared.export import REPORT_FILE, export_run
    from sheared.train.config import PruneConfig, TrainConfig
    from sheared.train.loop import run

    t0 = time.perf_counter()
    target = [f"pruning.target.{k}={v}" for k, v in vars(cfg.target).items()]
    if arm.prune is None:
        start = _random_target_model(cfg, out / "random-init")
    else:
        prune_cfg = load_config(
            PruneConfig, cfg.prune_config, [f"source={cfg.source}", *_common(cfg), *target, *arm.prune]
        )
        run(prune_cfg, out / "prune", resume=(out / "prune").exists())
        start = out / "pruned"
        if not (start / REPORT_FILE).is_file():
            export_run(out / "prune", start, force=start.exists())
    prune_seconds = time.perf_counter() - t0
    train_cfg = load_config(TrainConfig, cfg.train_config, [f"model={start}", *_common(cfg), *arm.train])
    t1 = time.perf_counter()
    run(train_cfg, out / "train", resume=(out / "train").exists())
    train_seconds = time.perf_counter() - t1
    final = out / "final"
    if not (final / REPORT_FILE).is_file():
        export_run(out / "train", final, force=final.exists())
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
    from sheared.train.run_files import EVAL_LOSS, read_metrics

    points = []
    offset = arm.calibration_tokens
    for run_name in ("prune", "train"):
        records = read_metrics(out / run_name)
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
    _figures(summary, out)
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


def _figures(summary: dict[str, Any], out: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: the study's figures are skipped (pip install 'sheared[plots]')")
        return
    arms, domains = summary["arms"], list(summary["source_eval_loss"])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, r in arms.items():
        points = [(p["tokens"], sum(p["eval_loss"].values()) / len(p["eval_loss"])) for p in r["curve"]]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(
        sum(summary["source_eval_loss"].values()) / len(domains),
        color="black",
        linestyle="--",
        label="source",
    )
    ax.set(
        title="mean held-out loss against tokens",
        xlabel="tokens (calibration + pruning + training)",
        ylabel="loss",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "loss_vs_tokens.png", dpi=110)

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / (len(arms) + 1)
    for i, (name, values) in enumerate(
        [("source", summary["source_eval_loss"])] + [(n, r["eval_loss"]) for n, r in arms.items()]
    ):
        ax.bar([d + i * width for d in range(len(domains))], [values[d] for d in domains], width, label=name)
    ax.set_xticks([d + 0.4 for d in range(len(domains))], domains)
    ax.set(title="final held-out loss per domain", ylabel="loss")
    ax.legend(fontsize="small", ncols=3)
    fig.savefig(out / "domain_losses.png", dpi=110)

    dbl = next((n for n in ("best+distill", "activation", *arms) if n in arms), None)
    if dbl is not None:
        from sheared.train.run_files import DOMAIN_WEIGHT, read_metrics

        records = read_metrics(out / dbl / "train")
        fig = Figure(figsize=(8, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        steps = [r["step"] for r in records]
        for d in domains:
            ax.plot(steps, [r.get(DOMAIN_WEIGHT + d, math.nan) for r in records], label=d)
        ax.set(
            title=f"domain weights of `{dbl}`'s continued pretraining (dynamic batch loading)", xlabel="step"
        )
        ax.legend(fontsize="small", ncols=2)
        fig.savefig(out / "domain_weights.png", dpi=110)
