"""`--dry-run`: validate a run config and print the plan, without loading weights or data.

The source's shape comes from its config alone (for large sources the model is built on the meta
device only to count parameters), so a plan for a 7B recipe prints on any machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from sheared.errors import UserError
from sheared.model import CausalLM, ModelArgs, parameter_counts, read_source_config
from sheared.model.args import describe
from sheared.precision import Precision
from sheared.pruning.search import (
    BUDGET_TOLERANCE,
    DEFAULT_WIDTH_MULTIPLE,
    amount_text,
    search_target,
    table,
)
from sheared.pruning.target import TargetBudget, TargetShape, mask_specs
from sheared.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    MASKS_DIR,
    METRICS_FILE,
    SCORES_FILE,
    TARGET_SEARCH_FILE,
    read_run_state,
)
from sheared.train.calibration import check_scores_option
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.distributed import pick_device
from sheared.train.setup import search_on_data, search_scoring, search_shapes


def _source_args(spec: str, fallback_config: str | None, init) -> tuple[ModelArgs, str]:
    """Shape of the source and a note on where it came from."""
    try:
        args, _, path = read_source_config(spec)
        return args, str(path)
    except UserError:
        if fallback_config is not None:
            args, _, path = read_source_config(fallback_config)
            return args, f"{spec} (not on this machine; shape from {path})"
        if init is not None:
            return None, f"{spec} (to be created: random {init.family} model)"
        raise


def _meta_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, prunable attention + MLP) parameters, counted on a meta-device model."""
    with torch.device("meta"):
        model = CausalLM(args)
    prunable = sum(
        p.numel()
        for layer in model.model.layers
        for m in (layer.self_attn, layer.mlp)
        for p in m.parameters()
    )
    return model.num_params(), prunable


def pruning_overhead(
    args: ModelArgs, specs, micro_batch: int, seq_len: int | None, precision: Precision
) -> str:
    """What pruning adds to plain training: mask parameters with their optimizer state, and the
    extra activations the masked forward keeps for the backward pass (estimate, per micro-batch)."""
    num = sum(math.prod(s.shape) for s in specs)
    text = f"pruning overhead: {num:,} log_alpha parameters ({num * 16 / 2**20:.1f} MiB with gradients and Adam states)"
    if seq_len is None:
        return text
    names = {s.name for s in specs}
    per_token = 0
    if names & {"kv_group", "head"}:
        per_token += args.num_attention_heads * args.head_dim  # scaled attention output
    if "intermediate" in names:
        per_token += args.intermediate_size  # scaled gated product
    if names & {"layer", "hidden"}:
        per_token += 2 * args.hidden_size  # scaled attention and MLP outputs
    extra = args.num_hidden_layers * micro_batch * seq_len * per_token * precision.bytes_per_value
    return text + (
        f"; masked activations about {extra / 2**30:.2f} GiB more per micro-batch of {micro_batch} x {seq_len} "
        "(without activation checkpointing)"
    )


def _data_lines(cfg, seq_len_hint: int | None) -> tuple[list[str], int | None, int | None]:
    """Lines about the data, its sequence length and its number of domains (None: not known yet)."""
    from sheared.data.tokens import METADATA_FILE, VAL_SPLIT, read_metadata

    path = Path(cfg.data.path)
    if (path / METADATA_FILE).is_file():
        meta = read_metadata(path)
        if seq_len_hint is not None and meta["seq_len"] != seq_len_hint:
            raise UserError(
                f"data.seq_len is {seq_len_hint} but {path} was prepared with seq_len {meta['seq_len']}"
            )
        lines = [f"data: {path} (seq_len {meta['seq_len']}, {meta['dtype']})"]
        for name, entry in meta["domains"].items():
            split = entry["splits"]
            val = f"   val {split[VAL_SPLIT]['sequences']:>6,} seq" if VAL_SPLIT in split else ""
            lines.append(
                f"  {name:<14} train {split['train']['sequences']:>9,} seq   eval {split['eval']['sequences']:>6,} seq{val}"
            )
            _check_calibration(cfg, name, split["train"]["sequences"])
        if all(VAL_SPLIT in e["splits"] for e in meta["domains"].values()):
            lines.append(
                "  reweighting reads the val split; results report the eval split, which no decision reads"
            )
        else:
            lines.append(
                "  note: no val split (prepared before validation splits existed): reweighting reads the eval "
                "split that results report too; prepare the data again for a separate one"
            )
        return lines, meta["seq_len"], len(meta["domains"])
    if cfg.data.auto_prepare is not None:
        auto = cfg.data.auto_prepare
        return (
            [f"data: {path} (missing; will be prepared from the {auto.corpus} corpus in {auto.corpus_dir})"],
            auto.seq_len,
            None,
        )
    return [f"data: {path} (missing; run `sheared data prepare` before training)"], seq_len_hint, None


def _check_calibration(cfg, domain: str, available: int) -> None:
    pruning = cfg.pruning if isinstance(cfg, PruneConfig) else None
    searching = pruning is not None and pruning.budget is not None and pruning.search == "loss"
    scoring = search_scoring(cfg) if searching else pruning and pruning.scoring
    calibrating = scoring == "activation" and not pruning.scores
    if calibrating and cfg.pruning.calibration > available:
        raise UserError(
            f"pruning.calibration is {cfg.pruning.calibration} sequences per domain but domain {domain!r} has "
            f"{available} training sequences; choose at most {available}"
        )


def _source_lines(cfg: PruneConfig | TrainConfig, args: ModelArgs | None, where: str) -> list[str]:
    lines = [f"{'source' if isinstance(cfg, PruneConfig) else 'model'}: {where}"]
    if args is None:  # a source_init model: its vocabulary comes from the tokenizer
        init = cfg.source_init
        return [*lines, f"  random {init.family}: {describe(init)}, tokenizer of {init.tokenizer}"]
    total, prunable = _meta_counts(args)
    counts = parameter_counts(args)
    assert total == counts["num_params"]
    return [
        *lines,
        f"  shape: {describe(args, detail=True)}",
        f"  parameters: {total:,} total, {counts['num_params_non_embedding']:,} non-embedding, "
        f"{prunable:,} prunable (attention + MLP)",
    ]


def _target_lines(target: TargetShape, args: ModelArgs | None, label: str = "target") -> list[str]:
    lines = [f"{label}: {describe(target)}"]
    if args is None:
        return lines
    specs = mask_specs(args, target)
    t_counts = parameter_counts(target.model_args(args))
    share = t_counts["num_params_non_embedding"] / parameter_counts(args)["num_params_non_embedding"]
    lines.append(
        f"  parameters: {t_counts['num_params']:,} total, {t_counts['num_params_non_embedding']:,} non-embedding "
        f"({share:.1%} of the source's)"
    )
    lines.append("masks:" if specs else "masks: none (the target equals the source)")
    for s in specs:
        lines.append(
            f"  {s.name:<13} shape {tuple(s.shape)}, keep {s.target_kept} of {s.row_size} per row "
            f"(target sparsity {s.target_sparsity:.3f})"
        )
    return lines


def _budget_lines(cfg: PruneConfig, args: ModelArgs | None) -> tuple[list[str], TargetShape | None]:
    """The rule-ranked candidates of a budget target, and the shape the plan assumes (None: not known)."""
    p = cfg.pruning
    lines = [
        f"target: budget {p.budget.describe()} (within {BUDGET_TOLERANCE:.0%}; widths multiples of "
        f"{p.width_multiple}, or the source's own)"
    ]
    if args is None:
        return [*lines, "  candidates: listed once the source exists (it is made when the run starts)"], None
    search = search_shapes(cfg, args)
    shown = min(len(search.ranked), max(p.search_candidates, 5))
    lines.append(
        f"  {search.num_valid:,} valid uniform shapes; the best of each (layers, query heads, KV groups) by "
        f"rule (imbalance of the shrink ratios, then distance to the budget), first {shown} of {len(search.ranked)}:"
    )
    lines += [f"  {line}" for line in table(search, shown, mark=p.search == "rule")]
    if p.search == "loss":
        scoring = search_scoring(cfg)
        measured = min(p.search_candidates, len(search.ranked))
        lines.append(
            f"  search: the run measures the calibration loss of the first {measured} under their one-shot "
            f"{scoring} masks ({p.calibration} sequences per domain) and uses the lowest"
        )
    else:
        lines.append("  search: rule; the run uses #1")
    shape = search.chosen.shape
    label = "target (#1, standing in for the measured choice)" if p.search == "loss" else "target"
    return lines + _target_lines(shape, args, label), shape


def _method_lines(cfg: PruneConfig, num_domains: int | None, seq_len: int | None) -> list[str]:
    """How the masks are found, and what scoring costs."""
    p = cfg.pruning
    if p.one_shot:
        line = f"method: {p.method} one-shot: scores, then the exact target; no training steps"
    else:
        line = f"method: l0 (learned hard-concrete masks), log_alpha init {p.init}"
    if p.scores is not None:
        return [line, f"  scores: reused from {p.scores} (no calibration)"]
    if p.scoring == "activation":
        passes = 2 if p.width_scores == "after_depth" else 1
        sequences = f"{p.calibration} sequences per domain"
        tokens = (
            f" = {p.calibration * num_domains * seq_len * passes:,} calibration tokens"
            if num_domains is not None and seq_len is not None
            else ""
        )
        line += f"\n  calibration: {sequences} × {passes} pass(es){tokens}; widths scored {p.width_scores.replace('_', ' ')}"
    return [line]


def _memory_line(strategy: str, world: int, args: ModelArgs | None) -> str:
    """What each rank holds: DDP keeps a full replica by definition, FSDP2 1/world of it."""
    strategy = ("ddp" if world > 1 else "none") if strategy == "auto" else strategy
    state = ""
    if args is not None:  # fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter
        full = parameter_counts(args)["num_params"] * 16 / 2**30
        share = full / world if strategy == "fsdp" else full
        state = f" ≈ {share:,.2f} GiB of weights, gradients and optimizer state per rank;"
    if strategy == "fsdp":
        how = (
            f"each rank holds 1/{world} of the model, read by slice from the source (no rank loads it whole)"
        )
    elif strategy == "ddp":
        how = "every rank holds a full replica of the model (DDP by definition; fsdp shards it)"
    else:
        how = "one process holds the whole model"
    return f"memory:{state} {how}"


def _loop_lines(
    cfg: PruneConfig | TrainConfig, args: ModelArgs | None, seq_len: int | None, target: TargetShape | None
) -> list[str]:
    loop, pruning = cfg.train, isinstance(cfg, PruneConfig)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = loop.accumulation_steps(world)
    lines = []
    # the device the run would get here (a cuda config is planned on the CPU of a machine without one)
    device = pick_device("cpu" if loop.device == "cpu" or not torch.cuda.is_available() else "auto")
    strategy = (
        ("ddp" if world > 1 else "none") if cfg.distributed.strategy == "auto" else cfg.distributed.strategy
    )
    precision = Precision.resolve(loop.precision, device, strategy)
    if target is not None and args is not None:
        specs = mask_specs(args, target)
        lines.append(pruning_overhead(args, specs, loop.micro_batch_size, seq_len, precision))
    if seq_len is not None:
        per_step = loop.global_batch_size * seq_len
        lines.append(
            f"tokens: {per_step:,} per step ({loop.global_batch_size} sequences × {seq_len}), "
            f"{per_step * loop.steps:,} in {loop.steps:,} steps"
        )
    lag = cfg.pruning.lagrangian_warmup_fraction * loop.steps if pruning else None
    return [
        *lines,
        f"batches: {world} rank(s) × {accum} micro-batch(es) of {loop.micro_batch_size} sequences; "
        f"strategy {cfg.distributed.strategy}",
        _memory_line(cfg.distributed.strategy, world, args),
        f"precision: {precision.describe()}",
        f"schedule: lr {cfg.optim.lr:g}, warm-up {round(cfg.optim.warmup_fraction * loop.steps)} steps, cosine to "
        f"{cfg.optim.min_lr_ratio:g}×"
        + (f"; Lagrangian warm-up {round(lag)} steps" if lag is not None else ""),
        f"data stream: {_stream_start(cfg)}",
        f"dynamic batch loading: {'every ' + str(loop.eval_interval) + ' steps' if cfg.data.dynamic else 'off'}; "
        f"reference losses: {cfg.data.reference_losses if isinstance(cfg.data.reference_losses, str) else 'explicit'}",
    ]


def _stream_start(cfg: PruneConfig | TrainConfig) -> str:
    """Where the run's data stream starts (SPEC §11): a pruned model's export carries its stream."""
    carried = read_run_state(cfg.source_spec).get("sampler") if isinstance(cfg, TrainConfig) else None
    if carried is None:
        return f"step 0 of a new stream (seed {cfg.train.seed})"
    if carried["seed"] != cfg.train.seed:
        return f"step 0 of a new stream: the pruning run's seed is {carried['seed']}, this run's {cfg.train.seed}"
    return f"the pruning run's stream at its step {carried['step']} (no sequence it read is read again)"


def plan(cfg: PruneConfig | TrainConfig, run_dir: str | Path | None = None) -> str:
    """The plan of a run as printable text; raises UserError for anything invalid."""
    pruning = isinstance(cfg, PruneConfig)
    if pruning:
        check_scores_option(cfg.pruning)  # what a run refuses, the plan refuses too
    loop = cfg.train
    args, where = _source_args(cfg.source_spec, cfg.shape_config, getattr(cfg, "source_init", None))
    if args is not None:
        cfg.distill.check_vocabulary(args.vocab_size)
    lines = [f"{'prune' if pruning else 'train'} plan", *_source_lines(cfg, args, where)]
    data_lines, seq_len, num_domains = _data_lines(cfg, cfg.data.seq_len)
    one_shot = pruning and cfg.pruning.one_shot
    budget = pruning and cfg.pruning.budget is not None
    target = None
    if budget:
        budget_lines, target = _budget_lines(cfg, args)
        lines += budget_lines
    elif pruning:
        target = cfg.pruning.target
        lines += _target_lines(target, args)
    if pruning:
        lines += _method_lines(cfg, num_domains, seq_len)
    lines += data_lines
    if not one_shot:
        lines += _loop_lines(cfg, args, seq_len, target)
    where = run_dir if run_dir is not None else "(give --run-dir to run)"
    searched = f", {TARGET_SEARCH_FILE}" if budget else ""
    if one_shot:
        lines.append(
            f"run directory: {where} ({CONFIG_FILE}, {METRICS_FILE}, {SCORES_FILE}{searched}, {MASKS_DIR}/)"
        )
    else:
        lines.append(
            f"run directory: {where} ({CONFIG_FILE}{searched}, {METRICS_FILE}, {CHECKPOINT_DIR}/ every {loop.save_interval} "
            f"steps, newest {loop.keep_checkpoints} kept{', ' + MASKS_DIR + '/ at the end' if pruning else ''})"
        )
    return "\n".join(lines)


def target_plan(
    source: str,
    budget: TargetBudget,
    *,
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE,
    top: int = 10,
    data: str | None = None,
    calibration: int = 8,
    candidates: int = 8,
    precision: str = "auto",
) -> str:
    """`sheared plan-target`: a budget's ranked candidates, rule-ranked from the source's config
    alone, or (with prepared `data`) with their calibration losses measured as a run measures them."""
    args, _, path = read_source_config(source)
    counts = parameter_counts(args)
    if data is None:
        search = search_target(args, budget, width_multiple=width_multiple, num_candidates=candidates)
    else:
        search = search_on_data(
            source,
            budget,
            data,
            calibration=calibration,
            candidates=candidates,
            width_multiple=width_multiple,
            precision=precision,
        )
    ranking = (
        f"the first {sum(c.loss is not None for c in search.ranked)} measured: calibration loss under their "
        f"one-shot activation masks ({calibration} sequences per domain of {data}); the lowest is used"
        if search.ranking == "loss"
        else "rule-ranked (imbalance of the shrink ratios, then distance to the budget); give --data to "
        "measure the calibration losses as a run does"
    )
    return "\n".join(
        [
            f"source: {path}",
            f"  shape: {describe(args, detail=True)}",
            f"  parameters: {counts['num_params']:,} total, {counts['num_params_non_embedding']:,} non-embedding",
            f"budget: {budget.describe()} = {amount_text(budget, search.goal)} (within {BUDGET_TOLERANCE:.0%}; widths multiples of "
            f"{width_multiple}, or the source's own)",
            f"{search.num_valid:,} valid uniform shapes, {len(search.ranked)} after keeping the best of each "
            f"(layers, query heads, KV groups); {ranking}",
            *table(search, top),
            f"used: {describe(search.chosen.shape)}",
        ]
    )
