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
arms that finished and resumes the others. What defines an arm besides its name and seed (the budget,
the target, the global batch size, the prune fraction: `arm_identity`) is stored in its result.json,
and a re-run with other values is refused naming the key, so that no old arm is labelled with a new
budget. A budget too small for an arm (under one step, or under its calibration and one step) is
refused with the smallest budget that fits, before anything runs.

`OUT/results.json`, `OUT/results.md` and the figures (`loss_vs_tokens.png`, `domain_losses.png`,
`domain_weights.png`) summarise all arms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.files import atomic_write_json, atomic_write_text, guard_writes, publish_dir
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
    "l0-oneshot",
    "best+distill",
    "best-fixed-mix",
)
PRUNED_ARMS = ("random", "magnitude", "activation", "l0-uniform", "l0-activation", "l0-oneshot")
ONE_SHOT = {"random": "random", "magnitude": "magnitude", "activation": "activation"}
L0_INIT = {"l0-uniform": "uniform", "l0-activation": "activation", "l0-oneshot": "oneshot"}
CALIBRATED = ("activation", "l0-activation", "l0-oneshot")  # arms whose calibration counts against the budget


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
    prune_fraction: float | list[float] = field(default_factory=lambda: [0.5])
    """Share of the budget the l0 arms spend learning masks (the rest is continued pretraining); a
    list sweeps it: every l0 arm runs once per value, named `ARM@FRACTION`."""
    evaluations: int = 5
    """Held-out evaluations along each training run (and at its end)."""
    scratch_lr: float | list[float] = field(default_factory=lambda: [1e-3])
    """Peak learning rate of the from-scratch arm (the pruned arms keep the train config's); several
    values are swept first on `scratch_sweep_fraction` of the budget (first seed), and the one with the
    lowest mean validation loss is used."""
    scratch_sweep_fraction: float = 0.25
    """Share of the budget each run of the scratch learning-rate sweep trains."""
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
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds: every arm runs once per seed (data order, mask noise, random init); results give the
    mean and sample standard deviation per arm and paired differences between arms (SPEC §11)."""

    def __post_init__(self) -> None:
        if not isinstance(self.prune_fraction, list):
            self.prune_fraction = [self.prune_fraction]
        if not isinstance(self.scratch_lr, list):
            self.scratch_lr = [self.scratch_lr]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be a non-empty list of different seeds, got {self.seeds}")
        if not self.scratch_lr or any(lr <= 0 for lr in self.scratch_lr):
            raise UserError(f"scratch_lr must be positive learning rates, got {self.scratch_lr}")
        if not 0 < self.scratch_sweep_fraction <= 1:
            raise UserError(f"scratch_sweep_fraction must be in (0, 1], got {self.scratch_sweep_fraction}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UserError(f"unknown study arm {unknown[0]!r}; valid arms: {', '.join(ARMS)}")
        if self.budget_tokens < 1 or self.global_batch_size < 1 or self.evaluations < 1:
            raise UserError("budget_tokens, global_batch_size and evaluations must be positive")
        bad = [f for f in self.prune_fraction if not 0 < f < 1]
        if bad or not self.prune_fraction:
            raise UserError(f"prune_fraction must be in (0, 1), got {bad[0] if bad else self.prune_fraction}")


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
    seed: int = 0
    """Seed of the arm's runs (data order, mask noise) and of the scratch arm's random init."""


def _steps(tokens: int, cfg: StudyConfig, seq_len: int) -> int:
    return max(1, tokens // (cfg.global_batch_size * seq_len))


def arm_labels(cfg: StudyConfig) -> list[str]:
    """The arms as run, in order: an l0 arm once per prune fraction (`ARM@FRACTION`) when several
    are swept."""
    labels = []
    for name in cfg.arms:
        if name in L0_INIT and len(cfg.prune_fraction) > 1:
            labels += [f"{name}@{f:g}" for f in cfg.prune_fraction]
        else:
            labels.append(name)
    return labels


def _parse_label(label: str, cfg: StudyConfig) -> tuple[str, float]:
    """(arm name, prune fraction) of an arm label."""
    name, _, fraction = label.partition("@")
    return name, float(fraction) if fraction else cfg.prune_fraction[0]


def plan_arm(
    label: str,
    cfg: StudyConfig,
    seq_len: int,
    num_domains: int,
    best: str | None,
    *,
    seed: int | None = None,
    scratch_lr: float | None = None,
    calibration: int | None = None,
) -> Arm:
    """The runs of one arm within the budget (`best`: the label of the best pruned arm, for the two
    last arms; `scratch_lr`: the swept learning rate of the scratch arm; `calibration`: the tokens of
    `calibration_tokens`, when the caller has them)."""
    name, fraction = _parse_label(label, cfg)
    base = name
    variant: dict[str, Any] = {"seed": cfg.seeds[0] if seed is None else seed}
    if name in ("best+distill", "best-fixed-mix"):
        if best is None:
            raise UserError(f"arm {name} needs at least one pruned arm to have finished first")
        base, fraction = _parse_label(best, cfg)
        variant |= {"distill": True} if name == "best+distill" else {"dynamic": False}
    if calibration is None:
        calibration = calibration_tokens(cfg, num_domains, seq_len)
    calibration = calibration if base in CALIBRATED else 0
    budget = cfg.budget_tokens - calibration
    if base == "scratch":
        lr = cfg.scratch_lr[0] if scratch_lr is None else scratch_lr
        return Arm(label, None, _steps(budget, cfg, seq_len), lr=lr, **variant)
    if base in ONE_SHOT:
        return Arm(
            label, ONE_SHOT[base], _steps(budget, cfg, seq_len), calibration_tokens=calibration, **variant
        )
    prune_steps = _steps(round(budget * fraction), cfg, seq_len)
    train_steps = _steps(budget - prune_steps * cfg.global_batch_size * seq_len, cfg, seq_len)
    return Arm(
        label,
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


def arm_identity(cfg: StudyConfig, label: str, base: str | None = None) -> dict[str, Any]:
    """What an arm's result depends on besides its label and seed (stored in its result.json): the
    budget, the target, the global batch size and, for arms that learn masks, the prune fraction
    (`base`: the best pruned arm a `best+distill` / `best-fixed-mix` arm repeats)."""
    name, fraction = _parse_label(label, cfg)
    if name in ("best+distill", "best-fixed-mix") and base is not None:
        name, fraction = _parse_label(base, cfg)
    return {
        "budget_tokens": cfg.budget_tokens,
        "target": cfg.target.as_dict(),
        "global_batch_size": cfg.global_batch_size,
        "prune_fraction": fraction if name in L0_INIT else None,
    }


def planned_tokens(arm: Arm, cfg: StudyConfig, seq_len: int) -> int:
    """Tokens an arm trains: its calibration and every step of its runs."""
    return arm.calibration_tokens + (arm.prune_steps + arm.train_steps) * cfg.global_batch_size * seq_len


def check_budget(cfg: StudyConfig, seq_len: int, num_domains: int) -> None:
    """Refuse a budget that some arm would overspend (every run trains at least one step, and the
    calibration counts too), or a scratch sweep shorter than one step, naming the smallest budget that
    fits every arm."""
    labels = [label for label in arm_labels(cfg) if not label.startswith("best")]  # they repeat a pruned arm
    calibration = calibration_tokens(cfg, num_domains, seq_len)
    step = cfg.global_batch_size * seq_len
    sweep = "scratch" in cfg.arms and len(cfg.scratch_lr) > 1

    def overspent(budget: int) -> tuple[str, int] | None:
        """(what, the tokens it needs) of the first arm that `budget` does not hold."""
        trial = dataclasses.replace(cfg, budget_tokens=budget)
        for label in labels:
            arm = plan_arm(label, trial, seq_len, num_domains, None, calibration=calibration)
            if planned_tokens(arm, trial, seq_len) > budget:
                return label, planned_tokens(arm, trial, seq_len)
        if sweep and round(budget * cfg.scratch_sweep_fraction) < step:
            return "the scratch learning-rate sweep", math.ceil((step - 0.5) / cfg.scratch_sweep_fraction)
        return None

    over = overspent(cfg.budget_tokens)
    if over is None:
        return
    # an arm that overspends a budget needs at least what it would spend (its steps only grow with the
    # budget), so jumping there finds the smallest budget that fits every arm
    smallest, need = cfg.budget_tokens, over
    while need is not None:
        smallest = max(smallest + 1, need[1])
        need = overspent(smallest)
    label, tokens = over
    what = f"{label} would train {tokens:,} tokens" if label in labels else f"{label} needs one step"
    raise UserError(
        f"budget_tokens {cfg.budget_tokens:,} is too small: {what} (one step is {cfg.global_batch_size} × "
        f"{seq_len} = {step:,} tokens; calibration counts too); the smallest budget that fits every arm is "
        f"{smallest:,} tokens"
    )


def check_finished_arms(cfg: StudyConfig, out: Path, seq_len: int, num_domains: int) -> None:
    """Refuse to reuse a finished arm (its result.json) that was made with another budget, target, batch or
    prune fraction, naming the key. A result of older code without its identity is checked by its
    token count (which the budget and the batch decide), with a note."""
    for label in arm_labels(cfg):
        for seed in cfg.seeds:
            done = out / label / f"seed-{seed}" / "result.json"
            if not done.is_file():
                continue
            result = json.loads(done.read_text())
            stored = result.get("identity")
            if stored is not None:
                _check_identity(done, stored, arm_identity(cfg, label, result.get("base")))
                continue
            arm = plan_arm(label, cfg, seq_len, num_domains, result.get("base"), seed=seed)
            if result["tokens"] != planned_tokens(arm, cfg, seq_len):
                raise UserError(
                    f"{done} was made on {result['tokens']:,} tokens but this study plans "
                    f"{planned_tokens(arm, cfg, seq_len):,} for it (budget_tokens or global_batch_size changed); "
                    f"use another --out, or delete {done.parent} to run it again"
                )
            print(
                f"sheared: note: {done} (older code) records no budget or target; only its tokens were checked",
                file=sys.stderr,
            )


def _check_identity(done: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    for key, value in wanted.items():
        if stored.get(key) != value:
            show = (
                (lambda v: describe(v))
                if key == "target"
                else (lambda v: f"{v:,}" if isinstance(v, int) else v)
            )
            raise UserError(
                f"{done} was made with {key} {show(stored.get(key))}, not {show(value)}; use another --out, or "
                f"delete {done.parent} to run it again"
            )


def _common(cfg: StudyConfig, run_cfg: RunConfig, arm: Arm) -> RunConfig:
    """What every run of the study shares: the data, the batch, the seed, and the arm's variant."""
    run_cfg = with_data(run_cfg, cfg.data, **({} if arm.dynamic else {"dynamic": False}))
    run_cfg = with_loop(
        run_cfg,
        global_batch_size=cfg.global_batch_size,
        micro_batch_size=cfg.global_batch_size,
        seed=arm.seed,
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


def _random_target_model(cfg: StudyConfig, out: Path, seed: int) -> Path:
    """A random-init model of the target shape (the source's family and tokenizer) for the scratch arm."""
    from sheared.model import CausalLM, save_hf

    if (out / "config.json").is_file():
        return out
    source = load_source(cfg.source)
    args = cfg.target.model_args(source.args)
    model = CausalLM(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    with publish_dir(out) as tmp:
        save_hf(model, tmp, tokenizer=source.tokenizer, base_config=source.hf_config)
    return out


def run_arm(arm: Arm, cfg: StudyConfig, out: Path) -> dict[str, Any]:
    """Prune (or make the random model), export, continue, export, evaluate; the arm's result."""
    from sheared.eval.evaluate import per_domain

    t0 = time.perf_counter()
    if arm.method is None:
        start = _random_target_model(cfg, out / "random-init", arm.seed)
    else:
        start = prune_and_export(prune_config(arm, cfg), out / "prune", out / "pruned")
    prune_seconds = time.perf_counter() - t0
    train_cfg = train_config(arm, cfg, start)
    t1 = time.perf_counter()
    final = continue_and_export(train_cfg, out / "train", out / "final")
    train_seconds = time.perf_counter() - t1
    losses = {d: v["loss"] for d, v in per_domain(str(final), cfg.data, 8, None).items()}
    decision = _decision_split(cfg)  # what choices read (best arm, scratch lr): never the reported split
    validation = (
        losses
        if decision == "eval"
        else {d: v["loss"] for d, v in per_domain(str(final), cfg.data, 8, None, decision).items()}
    )
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
        "val_split": decision,
        "mean_val_loss": sum(validation.values()) / len(validation),
        "curve": _curve(out, arm),
        "export": str(final),
    }
    if arm.method is not None:
        result["landing"] = landing(out, cfg)
    if cfg.tasks:
        from sheared.eval.harness import run_lm_eval

        result["tasks"] = run_lm_eval(str(final), cfg.tasks, include_path=cfg.include_path)
    return result


def landing(out: Path, cfg: StudyConfig) -> dict[str, float]:
    """How a pruned arm landed: the largest |expected − target sparsity| of its final masks, its last masked
    held-out loss, and the exported model's loss on the same sequences (SPEC §11: within 0.005 and 0.05)."""
    from sheared.eval.evaluate import per_domain
    from sheared.run_dir import EVAL_LOSS, RunDir

    run = RunDir(out / "prune")
    gaps = json.loads(run.masks_summary.read_text()).get("expected_minus_target_sparsity") or {}
    masked = [r for r in run.read_metrics() if any(k.startswith(EVAL_LOSS) for k in r)][-1]
    masked = {k[len(EVAL_LOSS) :]: v for k, v in masked.items() if k.startswith(EVAL_LOSS)}
    max_eval = (run.read_config() or {})["data"].get("max_eval_sequences")
    exported = {d: v["loss"] for d, v in per_domain(str(out / "pruned"), cfg.data, 8, max_eval).items()}
    return {
        "off_target": max(abs(v) for v in gaps.values()) if gaps else 0.0,
        "masked_eval_loss": statistics.fmean(masked.values()),
        "exported_eval_loss": statistics.fmean(exported[d] for d in masked),
        "export_gap": statistics.fmean(exported[d] - masked[d] for d in masked),
    }


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
    """Run (or finish) every arm for every seed, then write results.json, results.md and the figures.

    Each arm and seed runs under `OUT/<arm>/seed-<seed>/` and keeps its `result.json` there; a re-run
    skips what finished. Choices (the scratch arm's learning rate, the best pruned arm) read the
    validation split, never the held-out split that results report.
    """
    from sheared.data.tokens import PreparedData

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--out {out} is a file; give a folder (a new one, or the folder of a study to finish)"
        )
    data = PreparedData.open(cfg.data, verify="size")
    seq_len, domains = data.seq_len, data.domains
    check_budget(cfg, seq_len, len(domains))
    check_finished_arms(cfg, out, seq_len, len(domains))
    _check_sweep(cfg, out)
    with guard_writes(out):
        out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    reference = _source_losses(cfg, out)
    sweep = _scratch_sweep(cfg, out, seq_len, len(domains)) if "scratch" in cfg.arms else None
    results: dict[str, Any] = {}
    for label in arm_labels(cfg):
        best = _best_pruned(results) if label.startswith("best") else None
        per_seed = {}
        for seed in cfg.seeds:
            arm_dir = out / label / f"seed-{seed}"
            done = arm_dir / "result.json"
            if done.is_file():
                per_seed[seed] = json.loads(done.read_text())
                if "landing" not in per_seed[seed] and (arm_dir / "pruned").is_dir():  # results of older code
                    per_seed[seed]["landing"] = landing(arm_dir, cfg)
                    atomic_write_json(done, per_seed[seed])
                print(
                    f"== {label}, seed {seed}: done before (mean held-out loss {per_seed[seed]['mean_eval_loss']:.3f})"
                )
                continue
            scratch_lr = sweep["chosen"] if sweep is not None else None
            arm = plan_arm(label, cfg, seq_len, len(domains), best, seed=seed, scratch_lr=scratch_lr)
            print(
                f"\n== {label}, seed {seed}" + (f" (the best pruned arm: {best})" if best else ""), flush=True
            )
            result = run_arm(arm, cfg, arm_dir)
            result["seed"] = seed
            result["identity"] = arm_identity(cfg, label, best)
            if best is not None:
                result["base"] = best
            result["worst_excess"] = max(result["eval_loss"][d] - reference[d] for d in domains)
            atomic_write_json(done, result)
            per_seed[seed] = result
        results[label] = aggregate_seeds(per_seed, out / label)
    summary = {
        "machine": machine_summary(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "source": cfg.source,
        "target": describe(cfg.target),
        "budget_tokens": cfg.budget_tokens,
        "seeds": cfg.seeds,
        "val_split": _decision_split(cfg),
        "source_eval_loss": reference,
        "scratch_lr_sweep": sweep,
        "arms": results,
        "paired": paired_differences(results, cfg.seeds),
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", results_markdown(summary))
    study_figures(summary, out)
    print("\n" + results_markdown(summary))
    return summary


def _decision_split(cfg: StudyConfig) -> str:
    from sheared.data.tokens import PreparedData

    return PreparedData.open(cfg.data, verify="size").decision_split


def _best_pruned(results: dict[str, Any]) -> str | None:
    """The pruned arm with the lowest mean validation loss over its seeds (never the held-out loss)."""
    pruned = {n: r for n, r in results.items() if n.partition("@")[0] in PRUNED_ARMS}
    return min(pruned, key=lambda n: pruned[n]["mean_val_loss"]) if pruned else None


def _scratch_sweep(cfg: StudyConfig, out: Path, seq_len: int, num_domains: int) -> dict[str, Any]:
    """The scratch arm's learning rate: each of `scratch_lr` trained on `scratch_sweep_fraction` of the
    budget (first seed); the lowest mean validation loss wins. One value: no sweep."""
    if len(cfg.scratch_lr) == 1:
        return {"chosen": cfg.scratch_lr[0], "val_loss": {}}
    path = out / "scratch-sweep" / "sweep.json"
    if path.is_file():
        return json.loads(path.read_text())
    short = dataclasses.replace(
        cfg, budget_tokens=max(1, round(cfg.budget_tokens * cfg.scratch_sweep_fraction))
    )
    losses = {}
    for lr in cfg.scratch_lr:
        print(f"\n== scratch learning-rate sweep: lr {lr:g} on {short.budget_tokens:,} tokens", flush=True)
        arm = plan_arm("scratch", short, seq_len, num_domains, None, scratch_lr=lr)
        losses[f"{lr:g}"] = run_arm(arm, short, out / "scratch-sweep" / f"lr-{lr:g}")["mean_val_loss"]
    chosen = float(min(losses, key=losses.get))
    sweep = {"chosen": chosen, "val_loss": losses, "tokens": short.budget_tokens, "seed": cfg.seeds[0]}
    atomic_write_json(path, sweep)
    return sweep


def _check_sweep(cfg: StudyConfig, out: Path) -> None:
    """Refuse a finished scratch sweep made on another share of the budget or other learning rates."""
    path = out / "scratch-sweep" / "sweep.json"
    if "scratch" not in cfg.arms or len(cfg.scratch_lr) == 1 or not path.is_file():
        return
    sweep = json.loads(path.read_text())
    tokens = max(1, round(cfg.budget_tokens * cfg.scratch_sweep_fraction))
    rates = sorted(f"{lr:g}" for lr in cfg.scratch_lr)
    swept = sorted(sweep.get("val_loss", {}))
    if sweep.get("tokens") != tokens or swept != rates:
        raise UserError(
            f"{path} swept learning rates {', '.join(swept)} on {sweep.get('tokens')} tokens, not "
            f"{', '.join(rates)} on {tokens} (budget_tokens × scratch_sweep_fraction); use another --out, or "
            f"delete {path.parent} to sweep again"
        )


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate_seeds(per_seed: dict[int, dict[str, Any]], arm_dir: Path) -> dict[str, Any]:
    """One arm over its seeds: mean and sample sd of the mean held-out loss, per-domain means, the mean
    validation loss, and the first seed's curve and run folder (for the figures)."""
    runs = list(per_seed.values())
    first = runs[0]
    mean, sd = _mean_sd([r["mean_eval_loss"] for r in runs])
    domains = list(first["eval_loss"])
    return {
        "seeds": {str(s): r for s, r in per_seed.items()},
        "mean_eval_loss": mean,
        "sd_eval_loss": sd,
        "eval_loss": {d: statistics.fmean(r["eval_loss"][d] for r in runs) for d in domains},
        "mean_val_loss": statistics.fmean(r["mean_val_loss"] for r in runs),
        "worst_excess": statistics.fmean(r["worst_excess"] for r in runs),
        "tokens": first["tokens"],
        "seconds": {"total": statistics.fmean(r["seconds"]["total"] for r in runs)},
        "curve": first["curve"],
        "train_dir": str(arm_dir / f"seed-{first['seed']}" / "train"),
        **({"base": first["base"]} if "base" in first else {}),
    }


def paired_differences(results: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Every arm minus the reference arm (`activation` when it ran, else the first), seed by seed:
    the mean and sample sd of the per-seed differences of the mean held-out loss (SPEC §11)."""
    if not results:
        return {}
    ref = "activation" if "activation" in results else next(iter(results))
    paired = {"reference": ref, "differences": {}}
    for name, r in results.items():
        common = [str(s) for s in seeds if str(s) in r["seeds"] and str(s) in results[ref]["seeds"]]
        if name == ref or not common:
            continue
        diffs = [r["seeds"][s]["mean_eval_loss"] - results[ref]["seeds"][s]["mean_eval_loss"] for s in common]
        mean, sd = _mean_sd(diffs)
        paired["differences"][name] = {"mean": mean, "sd": sd, "seeds": len(diffs)}
    return paired


def _source_losses(cfg: StudyConfig, out: Path) -> dict[str, float]:
    from sheared.eval.evaluate import per_domain

    path = out / "source_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    losses = {d: v["loss"] for d, v in per_domain(cfg.source, cfg.data, 8, None).items()}
    atomic_write_json(path, losses)
    return losses


def results_markdown(summary: dict[str, Any]) -> str:
    """The study's tables: per arm, tokens, wall time, per-domain held-out loss (mean over seeds), mean ±
    sd over seeds, mean validation loss, worst excess; then the paired differences to the reference."""
    source = summary["source_eval_loss"]
    domains = list(source)
    seeds = summary.get("seeds", [0])
    head = (
        "| arm | tokens | minutes | tokens/s | "
        + " | ".join(domains)
        + f" | mean ± sd ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}) | val | worst excess |"
    )
    lines = [
        f"Source `{summary['source']}` → {summary['target']}; budget {summary['budget_tokens']:,} tokens per arm; "
        f"seeds {', '.join(map(str, seeds))}. Held-out split reported; choices read the "
        f"`{summary.get('val_split', 'eval')}` split.",
        "",
        head,
        "|" + "---|" * (len(domains) + 7),
        "| source (unpruned) | – | – | – | "
        + " | ".join(f"{source[d]:.3f}" for d in domains)
        + f" | {sum(source.values()) / len(source):.3f} | – | – |",
    ]
    for name, r in summary["arms"].items():
        seconds = r["seconds"]["total"]
        label = f"{name} ({r['base']})" if "base" in r else name
        sd = "" if r.get("sd_eval_loss") is None else f" ± {r['sd_eval_loss']:.3f}"
        lines.append(
            f"| {label} | {r['tokens']:,} | {seconds / 60:.1f} | {r['tokens'] / seconds:.0f} | "
            + " | ".join(f"{r['eval_loss'][d]:.3f}" for d in domains)
            + f" | {r['mean_eval_loss']:.3f}{sd} | {r.get('mean_val_loss', float('nan')):.3f} | {r['worst_excess']:+.3f} |"
        )
    paired = summary.get("paired") or {}
    if paired.get("differences"):
        lines += [
            "",
            f"Paired differences of the mean held-out loss, arm − `{paired['reference']}`, seed by seed "
            "(negative: the arm is better):",
            "",
            "| arm | mean difference | sd | seeds |",
            "|---|---|---|---|",
        ]
        for name, d in paired["differences"].items():
            sd = "–" if d["sd"] is None else f"{d['sd']:.3f}"
            lines.append(f"| {name} | {d['mean']:+.3f} | {sd} | {d['seeds']} |")
    landed = [
        (n, s, r["landing"])
        for n, a in summary["arms"].items()
        for s, r in a["seeds"].items()
        if "landing" in r
    ]
    if landed:
        lines += [
            "",
            "How the pruned arms landed: the largest |expected − target sparsity| of the final masks, and the "
            "held-out loss of the last masked evaluation against the exported model's on the same sequences:",
            "",
            "| arm | seed | off target | last masked | exported | export − masked |",
            "|---|---|---|---|---|---|",
        ]
        for name, seed, r in landed:
            lines.append(
                f"| {name} | {seed} | {r['off_target']:.4f} | {r['masked_eval_loss']:.3f} | "
                f"{r['exported_eval_loss']:.3f} | {r['export_gap']:+.3f} |"
            )
    sweep = summary.get("scratch_lr_sweep") or {}
    if sweep.get("val_loss"):
        tried = ", ".join(f"{lr}: {v:.3f}" for lr, v in sweep["val_loss"].items())
        lines += [
            "",
            f"Scratch learning rate {sweep['chosen']:g}, chosen by validation loss on {sweep['tokens']:,} tokens ({tried}).",
        ]
    return "\n".join(lines) + "\n"
