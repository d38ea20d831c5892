"""The one set-up path of every run (learned and one-shot pruning, continued pretraining): the
resolved plan (`Resolved`: device, precision, exact target, stream start), the model and its data,
a budget's exact target, the initial domain sampler, the one evaluation wrapper, and what a
finished run reports."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sheared.config import config_to_dict
from sheared.data.dbl import weights_by_domain, weights_proportional_to
from sheared.data.prepare import ensure_prepared
from sheared.data.sampler import DomainMixtureSampler
from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.eval.domain_loss import DomainMetrics, domain_metrics
from sheared.files import atomic_write_json
from sheared.model import CausalLM, Masks, Source, load_source, read_source_config
from sheared.model.args import ModelArgs, describe
from sheared.model.random_source import ensure_source
from sheared.precision import Precision
from sheared.pruning.importance import Scores, select_masks
from sheared.pruning.search import DEFAULT_WIDTH_MULTIPLE, TargetSearch, search_target, table
from sheared.pruning.target import TargetBudget, TargetShape, mask_specs
from sheared.run_dir import RunDir, checkpoint_step, read_metrics, read_trainer_state
from sheared.train import checkpoint as ckpt
from sheared.train.calibration import calibration_items, check_scores_option, compute_scores, load_scores
from sheared.train.config import DataConfig, LoopConfig, PruneConfig, PruningConfig, TrainConfig
from sheared.train.deadline import StepTimes
from sheared.train.distributed import DistEnv, barrier, init_distributed, load_sharded
from sheared.train.teacher import output_weight as teacher_output_weight


@dataclass
class RunResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_loss: float
    eval_losses: dict[str, float]
    domain_weights: dict[str, float]
    ran: bool = True
    """False when the run was finished before and nothing ran (`--resume` of a finished run)."""
    times: StepTimes | None = None
    """Seconds of its steps, its last evaluation and its last checkpoint (a run that ran)."""


@dataclass(frozen=True)
class Opening:
    """What `open_run_dir` decided before anything loads: resume from `checkpoint`, report the
    `finished` run as it is, or (both None) start at step 0."""

    checkpoint: Path | None = None
    finished: RunResult | None = None


def open_run_dir(
    cfg: PruneConfig | TrainConfig, files: RunDir, env: DistEnv, *, resume: bool, restart: bool
) -> Opening:
    """What a run does with its directory, decided before anything loads or is written.

    - `restart`: an earlier run's files move aside to `RUN.replaced-N/` (never deleted); step 0.
    - a new run: refused over a folder that holds a run (`RunDir.check_fresh`).
    - `resume`: refused when the config would make another run (`RunDir.check_resume`); a finished
      run is left as it is (a line says so); an unfinished one-shot run is done again (it has no
      checkpoint); otherwise the newest intact checkpoint, the damaged newer ones set aside with a
      line each. A run with no intact checkpoint is refused in one line: only `--restart` or another
      `--run-dir` starts it again, so a finished run is never overwritten.
    """
    if resume and restart:
        raise UserError("--resume continues the run in --run-dir and --restart moves it aside; pass one")
    if restart:
        if env.is_main and (aside := files.move_aside()) is not None:
            print(f"sheared: moved the earlier run in {files.path} to {aside}; starting again from step 0")
        barrier(env)
        return Opening()
    if not resume or not (files.is_run() or files.holds_run()):
        files.check_fresh(resume=False)
        return Opening()
    files.check_resume(config_to_dict(cfg))
    one_shot = files.kind() == "oneshot"
    if files.finished(None if one_shot else cfg.train.steps):
        if env.is_main:
            print(f"{files.path} holds a finished run ({_steps_done(files, one_shot)}); nothing to resume")
        return Opening(finished=finished_result(files))
    if one_shot:
        return Opening()
    damaged: list[tuple[Path, str]] = []
    checkpoint = files.intact_checkpoint(damaged)
    if checkpoint is None:
        raise UserError(_nothing_to_resume(files, damaged))
    if checkpoint_step(checkpoint) > cfg.train.steps:
        raise UserError(
            f"the run in {files.path} is at step {checkpoint_step(checkpoint)} ({checkpoint.name}), past "
            f"train.steps={cfg.train.steps}; resume with at least {checkpoint_step(checkpoint)} steps"
        )
    ckpt.set_aside(damaged, checkpoint)
    return Opening(checkpoint=checkpoint)


def _steps_done(files: RunDir, one_shot: bool) -> str:
    if one_shot:
        return "one-shot pruning: masks and final state"
    step = checkpoint_step(files.newest_checkpoint())
    return f"step {step} of {step}{', final masks' if files.masks.is_file() else ''}"


def _nothing_to_resume(files: RunDir, damaged: list[tuple[Path, str]]) -> str:
    """The one line refusing to resume a run with no intact checkpoint."""
    if damaged:
        why = "; ".join(f"{path.name}: {problem}" for path, problem in damaged[:3])
        why += f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    elif files.masks.is_file():
        why = "its checkpoints are gone"
    else:
        why = "it stopped before its first checkpoint"
    ended = " finished (its final masks are there) but" if files.masks.is_file() else ""
    return (
        f"the run in {files.path}{ended} holds no intact checkpoint to resume from ({why}); pass --restart "
        f"to move its files to {files.replaced_dir().name} and start again from step 0, or choose another --run-dir"
    )


def finished_result(files: RunDir) -> RunResult:
    """What a finished run reports, read from its files (final state, newest checkpoint, metrics)."""
    if files.kind() == "oneshot":
        state = files.read_final_state() or {}
        return RunResult(
            files.path, 0, math.nan, state.get("eval_losses", {}), state.get("domain_weights", {}), False
        )
    try:
        saved = read_trainer_state(files.newest_checkpoint())
        records = read_metrics(files.path)
    except (OSError, ValueError):  # a damaged trainer state or metrics line: report what is known
        saved, records = {}, []
    history = saved.get("history") or [{}]
    weights = dict(zip(saved.get("domains", []), (saved.get("sampler") or {}).get("weights", [])))
    final_loss = float(records[-1].get("lm_loss", math.nan)) if records else math.nan
    return RunResult(
        files.path, saved.get("step", 0), final_loss, history[-1].get("eval_loss", {}), weights, False
    )


@dataclass(frozen=True)
class Resolved:
    """What a run decides once, before its first step, and every room reads: where it runs, in
    which precision, the exact target (a budget's chosen shape; None for continued pretraining),
    and where its data stream starts. `pruning.target` of the config is never changed; a budget's
    shape lives here."""

    env: DistEnv
    precision: Precision
    target: TargetShape | None = None
    stream_start: str = "step 0"
    """Where the domain sampler starts: `step 0` of a new run (seeded by `train.seed`), or the
    checkpoint a resumed run continues from."""

    @property
    def device(self) -> torch.device:
        return self.env.device

    def config_to_save(self, cfg: PruneConfig | TrainConfig) -> PruneConfig | TrainConfig:
        """The config as config.yaml records it: a budget replaced by the exact shape it chose, so that
        export and a resumed run read a concrete target."""
        if not isinstance(cfg, PruneConfig) or self.target is None:
            return cfg
        return dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, target=self.target))


def resolve_run(cfg: PruneConfig | TrainConfig) -> Resolved:
    """Join the process group, pick the device and resolve the precision: the start of every run."""
    if isinstance(cfg, PruneConfig):
        check_scores_option(cfg.pruning)  # before anything is written
    env = init_distributed(cfg.distributed, cfg.train.device)
    precision = Precision.resolve(cfg.train.precision, env.device, env.strategy)
    target = cfg.pruning.target if isinstance(cfg, PruneConfig) and cfg.pruning.budget is None else None
    return Resolved(env, precision, target)


@dataclass
class RunInputs:
    """What `load_run_inputs` gives both kinds of pruning run and continued pretraining."""

    source: Source
    data: PreparedData
    resolved: Resolved
    """With the exact target (pruning runs)."""
    scored: tuple[Scores, dict[str, Any]] | None = None
    """The run's own importance scores when a budget's search already made them, or `pruning.scores`
    (read and checked here, before the run writes anything)."""


def load_run_inputs(
    cfg: PruneConfig | TrainConfig, files: RunDir, resolved: Resolved, *, resume: bool, progress: bool
) -> RunInputs:
    """The one set-up path of learned, one-shot and continued-pretraining runs: seed, model, data,
    and (pruning) the exact target of a budget."""
    torch.manual_seed(cfg.train.seed)
    source, data = load_model_and_data(cfg, resolved)
    scored = None
    if isinstance(cfg, PruneConfig) and cfg.pruning.budget is not None:
        shape, scored = resolve_target(cfg, source, data, resolved, files, resume=resume, progress=progress)
        resolved = dataclasses.replace(resolved, target=shape)
    elif isinstance(cfg, PruneConfig) and cfg.pruning.scores is not None:  # checked before the run writes
        scored = load_scores(
            cfg.pruning.scores, source.args, source=cfg.source_spec, data=data, note=resolved.env.is_main
        )
    return RunInputs(source, data, resolved, scored)


def load_model_and_data(cfg: PruneConfig | TrainConfig, resolved: Resolved) -> tuple[Source, PreparedData]:
    """The model to train (made first when the config says how; in train mode) and its prepared data.

    Under FSDP2 the model comes sharded (`load_sharded`: each rank reads only its rows); otherwise
    every rank loads the whole model (DDP keeps a full replica by definition).
    """
    spec, env = cfg.source_spec, resolved.env
    if isinstance(cfg, PruneConfig) and cfg.source_init is not None and env.is_main:
        ensure_source(cfg.source_init, spec)
    barrier(env)
    if (
        isinstance(cfg, PruneConfig) and cfg.pruning.budget is not None
    ):  # a bad budget fails before the weights load
        search_shapes(cfg, read_source_config(spec)[0])
    if env.strategy == "fsdp":
        source = load_sharded(spec, env, cfg.distributed.activation_checkpointing, resolved.precision)
    else:
        source = load_source(spec, device=env.device)
    cfg.distill.check_vocabulary(source.args.vocab_size)
    if env.is_main:
        ensure_prepared(cfg.data.path, cfg.data.auto_prepare, source.tokenizer, spec)
    barrier(env)
    data = PreparedData.open(cfg.data.path, verify=cfg.data.verify)
    data.check_tokenizer(source.tokenizer)
    if cfg.data.seq_len is not None and cfg.data.seq_len != data.seq_len:
        raise UserError(
            f"data.seq_len is {cfg.data.seq_len} but {cfg.data.path} was prepared with seq_len {data.seq_len}"
        )
    target = resolved.target
    if target is not None and not mask_specs(source.args, target):
        raise UserError(
            f"the target equals the source ({describe(source.args)}) in every dimension; there is nothing to "
            "prune: make at least one of pruning.target's numbers smaller"
        )
    source.model.train()
    return source, data


def evaluate(
    model: torch.nn.Module,
    data: PreparedData,
    cfg: PruneConfig | TrainConfig,
    resolved: Resolved,
    masks: Masks | None = None,
    *,
    split: str = "eval",
    max_sequences: int | None = None,
    teacher: torch.nn.Module | None = None,
) -> DomainMetrics:
    """The one evaluation of a run: per-domain loss (and KL to a teacher) of `model` under `masks`,
    in eval mode and the run's precision, summed over ranks; the model's mode is restored.

    The held-out (`eval`) and validation (`val`) splits read `data.max_eval_sequences` sequences per
    domain unless `max_sequences` says otherwise; calibration reads the training split.
    """
    on_device = None if masks is None else masks.to(resolved.device)
    was_training = model.training
    model.eval()
    try:
        return domain_metrics(
            model,
            data,
            split=split,
            batch_size=cfg.data.eval_batch_size,
            masks=on_device,
            max_sequences=max_sequences if split == "train" else max_sequences or cfg.data.max_eval_sequences,
            device=resolved.device,
            autocast_dtype=resolved.precision.autocast_dtype,
            teacher=teacher,
            teacher_weight=(lambda: teacher_output_weight(teacher)) if teacher is not None else None,
            chunk_size=cfg.train.loss_chunk_tokens,
        )
    finally:
        model.train(was_training)


def search_shapes(cfg: PruneConfig, source: ModelArgs, measure=None) -> TargetSearch:
    """`search_target` with the run's budget and search settings (rule-ranked when `measure` is None)."""
    p = cfg.pruning
    return search_target(
        source, p.budget, width_multiple=p.width_multiple, num_candidates=p.search_candidates, measure=measure
    )


def search_scoring(cfg: PruneConfig) -> str:
    """The scores that rank a budget's candidates: the run's own scoring method, or activation for
    learned masks with a uniform init."""
    return cfg.pruning.scoring or "activation"


def calibration_loss(
    cfg: PruneConfig, model: torch.nn.Module, data: PreparedData, masks: Masks | None, resolved: Resolved
) -> float:
    """Mean next-token loss under `masks` on the calibration sequences (the first
    `pruning.calibration` training sequences of every domain), summed over ranks; every domain
    has as many tokens, so the mean of the domains' losses is the mean over tokens."""
    calibration_items(data, cfg.pruning.calibration)  # refuses more sequences than a domain has
    losses = evaluate(
        model, data, cfg, resolved, masks, split="train", max_sequences=cfg.pruning.calibration
    ).loss
    return sum(losses.values()) / len(losses)


def measured_search(
    cfg: PruneConfig,
    model: torch.nn.Module,
    args: ModelArgs,
    data: PreparedData,
    resolved: Resolved,
    *,
    progress: bool = True,
) -> tuple[TargetSearch, tuple[Scores, dict[str, Any]] | None]:
    """The budget's candidates ranked as `pruning.search` says, and the scores computed for it.

    `loss`: the full model's `search_scoring` scores are computed once (they do not depend on the
    target); each of the first `pruning.search_candidates` rule-ranked shapes gets its one-shot
    masks (`select_masks`) and its calibration loss is measured; the lowest wins.
    """
    if cfg.pruning.search == "rule":
        return search_shapes(cfg, args), None
    scores, info = compute_scores(
        cfg,
        model,
        args,
        data,
        resolved.env,
        target=None,  # scores of the full model: they do not depend on the target
        method=search_scoring(cfg),
        autocast_dtype=resolved.precision.autocast_dtype,
        progress=progress,
    )
    bar = tqdm(total=cfg.pruning.search_candidates, desc="target search", unit="shape", disable=not progress)

    def measure(shape: TargetShape) -> float:
        loss = calibration_loss(cfg, model, data, select_masks(scores, mask_specs(args, shape)), resolved)
        bar.update(1)
        return loss

    try:
        search = search_shapes(cfg, args, measure)
    finally:
        bar.close()
    search.notes = {
        "scores": info.get("reused_from") or info.get("method"),
        "calibration_sequences_per_domain": cfg.pruning.calibration,
    }
    return search, (scores, info)


def search_on_data(
    source_spec: str,
    budget: TargetBudget,
    data_dir: str,
    *,
    calibration: int = 8,
    candidates: int = 8,
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE,
    precision: str = "auto",
    progress: bool = True,
) -> TargetSearch:
    """A budget's candidates measured as a one-shot activation run measures them (`sheared plan-target
    --data`): one process, the source on the default device, `precision` as `train.precision`."""
    pruning = PruningConfig(
        target=budget,
        method="activation",
        calibration=calibration,
        search_candidates=candidates,
        width_multiple=width_multiple,
    )
    loop = LoopConfig(steps=1, global_batch_size=1, micro_batch_size=1, precision=precision)
    cfg = PruneConfig(
        source=source_spec, data=DataConfig(path=data_dir, verify="size"), pruning=pruning, train=loop
    )
    search_shapes(cfg, read_source_config(source_spec)[0])  # a bad budget fails before the weights load
    resolved = resolve_run(cfg)
    source = load_source(source_spec, device=resolved.device)
    data = PreparedData.open(data_dir, verify="size")
    data.check_tokenizer(source.tokenizer)
    return measured_search(cfg, source.model, source.args, data, resolved, progress=progress)[0]


def resolve_target(
    cfg: PruneConfig,
    source: Source,
    data: PreparedData,
    resolved: Resolved,
    files: RunDir,
    *,
    resume: bool,
    progress: bool = True,
) -> tuple[TargetShape, tuple[Scores, dict[str, Any]] | None]:
    """The exact shape of a budget target, and the run's own scores when the search made them.

    The budget is searched (`measured_search`), the ranked candidates and the chosen shape are
    written to `target_search.json`, and the chosen shape becomes `Resolved.target`, so that
    everything after (masks, L0 module, the saved config that export reads) sees a concrete shape.
    A resumed run takes the shape its first attempt chose.
    """
    env = resolved.env
    recorded = _recorded_shape(files, cfg) if resume else None
    scored = None
    if recorded is not None:
        shape = recorded
    else:
        search, scored = measured_search(cfg, source.model, source.args, data, resolved, progress=progress)
        shape = search.chosen.shape
        if env.is_main:
            atomic_write_json(files.target_search, search.to_json())
            print(_chosen_line(search, files), flush=True)
            if progress:
                print("\n".join(table(search)), flush=True)
    # the search's scores are the run's own when the run scores the same way on the full model
    own = cfg.pruning.scoring is not None and (
        cfg.pruning.width_scores == "full" or cfg.pruning.scores is not None
    )
    return shape, scored if own else None


def _chosen_line(search: TargetSearch, files: RunDir) -> str:
    c = search.chosen
    measured = sum(x.loss is not None for x in search.ranked)
    why = (
        f"the lowest calibration loss ({c.loss:.4f}) of the first {measured} of {len(search.ranked)} candidates"
        if search.ranking == "loss"
        else f"the first by the rule of {len(search.ranked)} candidates"
    )
    return (
        f"target: {search.budget.describe()} -> {describe(c.shape)} ({c.num_params:,} parameters, "
        f"{c.off:+.2%} vs the budget; {why}; table in {files.target_search})"
    )


def _recorded_shape(files: RunDir, cfg: PruneConfig) -> TargetShape | None:
    """The shape an earlier attempt of this run chose for the same budget, or None."""
    if not files.target_search.is_file():
        return None
    record = json.loads(files.target_search.read_text())
    budget = cfg.pruning.budget
    if TargetBudget(**record["budget"]) != budget or record["width_multiple"] != cfg.pruning.width_multiple:
        raise UserError(
            f"{files.target_search} was searched for another budget ({record['budget']}, width multiple "
            f"{record['width_multiple']}); resume with the same pruning.target and pruning.width_multiple, "
            "or choose another --run-dir"
        )
    return TargetShape(**record["chosen"])


def run_scores(
    cfg: PruneConfig,
    model: CausalLM,
    data: PreparedData,
    resolved: Resolved,
    scored=None,
    progress: bool = True,
) -> tuple[Scores, dict[str, Any]]:
    """The run's one-shot scores at its target: `scored` (what a budget's search already computed the
    same way), else computed now."""
    return scored or compute_scores(
        cfg,
        model,
        model.args,
        data,
        resolved.env,
        target=resolved.target,
        autocast_dtype=resolved.precision.autocast_dtype,
        progress=progress,
    )


def initial_sampler(
    cfg: PruneConfig | TrainConfig, data: PreparedData, previous: dict[str, Any]
) -> tuple[DomainMixtureSampler, str]:
    """The domain sampler a run starts with, and where its stream starts (a line for the plan).

    Continued pretraining of a pruned model (`previous`: the state its export kept) carries on the
    pruning run's stream — its step, each domain's epoch and position, its final weights — so that no
    sequence is read twice before its domain runs out (SPEC §11). A stream of another seed or other
    data cannot be continued; it starts at step 0 and the line says why. Initial weights: given,
    carried from pruning, or by size.
    """
    domains = data.domains
    sizes = [data.num_sequences(d, "train") for d in domains]
    if cfg.data.initial_weights is not None:
        weights = weights_by_domain(cfg.data.initial_weights, domains, "data.initial_weights")
    elif previous.get("domain_weights") and set(previous["domain_weights"]) == set(domains):
        weights = weights_by_domain(previous["domain_weights"], domains, "the pruning run's final weights")
    else:
        weights = weights_proportional_to([data.num_tokens(d, "train") for d in domains])
    sampler = DomainMixtureSampler(domains, sizes, weights, cfg.train.seed)
    carried = previous.get("sampler")
    if carried is None:
        return sampler, f"step 0 of a new stream (seed {cfg.train.seed})"
    mine = sampler.state_dict()
    differs = [k for k in ("domains", "num_sequences", "seed") if carried.get(k) != mine[k]]
    if differs:
        return sampler, (
            f"step 0 of a new stream: the pruning run's stream has another {' and '.join(differs)} "
            f"(its {differs[0]} {carried.get(differs[0])}, this run's {mine[differs[0]]}), so it cannot be continued"
        )
    sampler.load_state_dict(carried)
    sampler.set_weights(weights)
    read = sum(p + e * n for p, e, n in zip(carried["position"], carried["epoch"], sizes))
    return sampler, (
        f"the pruning run's stream at its step {carried['step']} ({read:,} sequences already read; "
        "none is read again before its domain runs out)"
    )
