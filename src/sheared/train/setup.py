"""Set-up shared by learned (`loop`) and one-shot (`oneshot`) runs: the model and its data, the
exact target of a budget, the initial domain sampler, and what a finished run reports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sheared.data.dbl import weights_by_domain, weights_proportional_to
from sheared.data.prepare import ensure_prepared
from sheared.data.sampler import DomainMixtureSampler
from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.eval.domain_loss import domain_losses
from sheared.files import atomic_write_json
from sheared.hardware import resolve_precision
from sheared.model import Masks, Source, load_source, read_source_config
from sheared.model.args import ModelArgs, describe
from sheared.model.random_source import ensure_source
from sheared.pruning.importance import Scores, select_masks
from sheared.pruning.search import DEFAULT_WIDTH_MULTIPLE, TargetSearch, search_target, table
from sheared.pruning.target import SHAPE_KEYS, TargetBudget, TargetShape, mask_specs
from sheared.run_dir import RunDir
from sheared.train.calibration import calibration_items, compute_scores
from sheared.train.config import DataConfig, LoopConfig, PruneConfig, PruningConfig, TrainConfig
from sheared.train.distributed import DistEnv, barrier, init_distributed, load_sharded


@dataclass
class RunResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_loss: float
    eval_losses: dict[str, float]
    domain_weights: dict[str, float]


def load_model_and_data(
    cfg: PruneConfig | TrainConfig, env: DistEnv, bf16: bool = False
) -> tuple[Source, PreparedData]:
    """The model to train (made first when the config says how; in train mode) and its prepared data.

    Under FSDP2 the model comes sharded (`load_sharded`: each rank reads only its rows); otherwise
    every rank loads the whole model (DDP keeps a full replica by definition).
    """
    spec = cfg.source_spec
    if isinstance(cfg, PruneConfig) and cfg.source_init is not None and env.is_main:
        ensure_source(cfg.source_init, spec)
    barrier(env)
    if (
        isinstance(cfg, PruneConfig) and cfg.pruning.budget is not None
    ):  # a bad budget fails before the weights load
        search_shapes(cfg, read_source_config(spec)[0])
    if env.strategy == "fsdp":
        source = load_sharded(spec, env, cfg.distributed.activation_checkpointing, bf16)
    else:
        source = load_source(spec, device=env.device)
    if env.is_main:
        ensure_prepared(cfg.data.path, cfg.data.auto_prepare, source.tokenizer, spec)
    barrier(env)
    data = PreparedData.open(cfg.data.path, verify=cfg.data.verify)
    data.check_tokenizer(source.tokenizer)
    if cfg.data.seq_len is not None and cfg.data.seq_len != data.seq_len:
        raise UserError(
            f"data.seq_len is {cfg.data.seq_len} but {cfg.data.path} was prepared with seq_len {data.seq_len}"
        )
    target = cfg.pruning.target if isinstance(cfg, PruneConfig) else None
    if isinstance(target, TargetShape) and not mask_specs(source.args, target):
        raise UserError(
            f"the target equals the source ({describe(source.args)}) in every dimension; there is nothing to "
            "prune: make at least one of pruning.target's numbers smaller"
        )
    source.model.train()
    return source, data


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


def _search_scores_config(cfg: PruneConfig, args: ModelArgs) -> PruneConfig:
    """`cfg` asking `compute_scores` for the `search_scoring` scores on the full model (the
    source's own shape stands in for the target, which full-model scores do not read)."""
    p = cfg.pruning
    source_shape = TargetShape(*(getattr(args, k) for k in SHAPE_KEYS))
    init = p.init if p.one_shot else search_scoring(cfg)
    pruning = dataclasses.replace(p, target=source_shape, init=init, width_scores="full")
    return dataclasses.replace(cfg, pruning=pruning)


def calibration_loss(
    cfg: PruneConfig,
    model: torch.nn.Module,
    data: PreparedData,
    masks: Masks | None,
    env: DistEnv,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean next-token loss under `masks` on the calibration sequences (the first
    `pruning.calibration` training sequences of every domain), summed over ranks; every domain
    has as many tokens, so the mean of the domains' losses is the mean over tokens."""
    calibration_items(data, cfg.pruning.calibration)  # refuses more sequences than a domain has
    on_device = (
        None if masks is None else Masks(**{n: getattr(masks, n).to(env.device) for n in masks.names()})
    )
    was_training = model.training
    model.eval()
    losses = domain_losses(
        model,
        data,
        split="train",
        batch_size=cfg.data.eval_batch_size,
        masks=on_device,
        max_sequences=cfg.pruning.calibration,
        device=env.device,
        autocast_dtype=autocast_dtype,
    )
    model.train(was_training)
    return sum(losses.values()) / len(losses)


def measured_search(
    cfg: PruneConfig,
    model: torch.nn.Module,
    args: ModelArgs,
    data: PreparedData,
    env: DistEnv,
    *,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[TargetSearch, tuple[Scores, dict[str, Any]] | None]:
    """The budget's candidates ranked as `pruning.search` says, and the scores computed for it.

    `loss`: the scores of `search_scores_config` are computed once (they do not depend on the
    target); each of the first `pruning.search_candidates` rule-ranked shapes gets its one-shot
    masks (`select_masks`) and its calibration loss is measured; the lowest wins.
    """
    if cfg.pruning.search == "rule":
        return search_shapes(cfg, args), None
    scoring_cfg = _search_scores_config(cfg, args)
    scores, info = compute_scores(
        scoring_cfg, model, args, data, env, autocast_dtype=autocast_dtype, progress=progress
    )
    bar = tqdm(total=cfg.pruning.search_candidates, desc="target search", unit="shape", disable=not progress)

    def measure(shape: TargetShape) -> float:
        loss = calibration_loss(
            cfg, model, data, select_masks(scores, mask_specs(args, shape)), env, autocast_dtype
        )
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
    env = init_distributed(cfg.distributed, loop.device)
    bf16 = resolve_precision(loop.precision, env.device)[0] == "bf16"
    source = load_source(source_spec, device=env.device)
    data = PreparedData.open(data_dir, verify="size")
    data.check_tokenizer(source.tokenizer)
    autocast = torch.bfloat16 if bf16 else None
    return measured_search(
        cfg, source.model, source.args, data, env, autocast_dtype=autocast, progress=progress
    )[0]


def resolve_target(
    cfg: PruneConfig,
    source: Source,
    data: PreparedData,
    env: DistEnv,
    files: RunDir,
    *,
    resume: bool,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[PruneConfig, tuple[Scores, dict[str, Any]] | None]:
    """`cfg` with `pruning.target` an exact shape, and the run's own scores when the search made them.

    An exact target is returned as it is. A budget is searched (`measured_search`), the ranked
    candidates and the chosen shape are written to `target_search.json`, and the chosen shape
    replaces the budget, so that everything after (masks, L0 module, the saved config that export
    reads) sees a concrete shape. A resumed run takes the shape its first attempt chose.
    """
    budget = cfg.pruning.budget
    if budget is None:
        return cfg, None
    recorded = _recorded_shape(files, cfg) if resume else None
    scored = None
    if recorded is not None:
        shape = recorded
    else:
        search, scored = measured_search(
            cfg, source.model, source.args, data, env, autocast_dtype=autocast_dtype, progress=progress
        )
        shape = search.chosen.shape
        if env.is_main:
            atomic_write_json(files.target_search, search.to_json())
            print(_chosen_line(search, files), flush=True)
            if progress:
                print("\n".join(table(search)), flush=True)
    resolved = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, target=shape))
    # the search's scores are the run's own when the run scores the same way on the full model
    own = cfg.pruning.scoring is not None and (
        cfg.pruning.width_scores == "full" or cfg.pruning.scores is not None
    )
    return resolved, scored if own else None


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


def initial_sampler(
    cfg: PruneConfig | TrainConfig, data: PreparedData, previous: dict[str, Any]
) -> DomainMixtureSampler:
    """The domain sampler with its initial weights: given, carried from pruning, or by size."""
    domains = data.domains
    if cfg.data.initial_weights is not None:
        weights = weights_by_domain(cfg.data.initial_weights, domains, "data.initial_weights")
    elif previous.get("domain_weights") and set(previous["domain_weights"]) == set(domains):
        weights = weights_by_domain(previous["domain_weights"], domains, "the pruning run's final weights")
    else:
        weights = weights_proportional_to([data.num_tokens(d, "train") for d in domains])
    sizes = [data.num_sequences(d, "train") for d in domains]
    return DomainMixtureSampler(domains, sizes, weights, cfg.train.seed)
