"""The training loop shared by `sheared prune` (with masks) and `sheared train` (without).

Reads top to bottom:

1. set up: process group and device, run directory, source model, prepared data, masks;
2. domain weights, reference losses and the sampler; optimizer and schedule; resume;
3. every step: the global batch from the sampler, this rank's micro-batches, one mask sample per
   micro-batch (seeded by step and global micro-batch index, never by rank), backward; the
   Lagrangian once per step; gradient clipping on the model weights; one AdamW step;
4. every `eval_interval` steps: per-domain eval loss (under deterministic masks at the expected
   size while pruning), then the dynamic-batch-loading update of the domain weights;
5. checkpoints (atomic, exact resume) and, at the end, the final masks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sheared.config import save_config
from sheared.data.dbl import update_domain_weights, weights_by_domain, weights_proportional_to
from sheared.data.sampler import DomainMixtureSampler, rank_slice
from sheared.errors import UserError
from sheared.eval.domain_loss import domain_losses
from sheared.eval.lm import next_token_loss
from sheared.model import CausalLM, Masks, load_source
from sheared.pruning import L0Module, LagrangianConstraint
from sheared.pruning.compaction import kept_structure
from sheared.pruning.constraint import warmed_up_target
from sheared.train import checkpoint as ckpt
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.data_setup import ensure_prepared, ensure_source, read_reference_losses
from sheared.train.distributed import (
    DistEnv,
    all_reduce_sum,
    assert_same_on_all_ranks,
    average_gradients,
    barrier,
    gradient_sync,
    init_distributed,
    shutdown,
    wrap_model,
)
from sheared.train.metrics import MetricsWriter
from sheared.train.optim import build_optimizer, lr_multiplier, set_learning_rates

MASKS_DIR = "masks"
MASKS_FILE = "masks.pt"
MASKS_SUMMARY = "masks.json"
# Written by `sheared export` next to a model: the run's domain weights and reference losses, so
# that continued pretraining starts from them.
RUN_STATE_FILE = "sheared_run_state.json"


class Trainable(nn.Module):
    """Everything the optimizer updates, under one module so checkpoints name it consistently."""

    def __init__(self, model: nn.Module, l0: L0Module | None, lagrangian: LagrangianConstraint | None):
        super().__init__()
        self.model = model
        self.l0 = l0
        self.lagrangian = lagrangian


@dataclass
class RunResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_loss: float
    eval_losses: dict[str, float]
    domain_weights: dict[str, float]


def mask_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's mask sample: seeded by (seed, step, global micro-batch)."""
    state = np.random.SeedSequence([seed, step, micro_batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        return
    if ckpt.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, or choose another --run-dir"
        )


def run(
    cfg: PruneConfig | TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> RunResult:
    """Run `sheared prune` (a `PruneConfig`) or `sheared train` (a `TrainConfig`) into `run_dir`."""
    pruning = isinstance(cfg, PruneConfig)
    run_dir = Path(run_dir)
    loop = cfg.train
    env = init_distributed(cfg.distributed, loop.device)
    try:
        return _run(cfg, run_dir, env, pruning, resume, progress and env.is_main)
    finally:
        shutdown(env)


def _run(cfg, run_dir: Path, env: DistEnv, pruning: bool, resume: bool, progress: bool) -> RunResult:
    loop = cfg.train
    bf16 = loop.precision == "bf16"
    autocast_dtype = torch.bfloat16 if bf16 and env.strategy != "fsdp" else None
    _check_run_dir(run_dir, resume)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(loop.seed)

    # --- 1. model, data, masks -------------------------------------------------------------------
    source_spec = cfg.source if pruning else cfg.model
    if pruning and cfg.source_init is not None and env.is_main:
        ensure_source(cfg.source_init, source_spec)
    barrier(env)
    source = load_source(source_spec, device=env.device)
    model: CausalLM = source.model.train()
    if env.is_main:
        ensure_prepared(cfg.data, source.tokenizer, source_spec)
    barrier(env)
    from sheared.data.tokens import PreparedData

    data = PreparedData.open(cfg.data.path, verify=cfg.data.verify)
    data.check_tokenizer(source.tokenizer)
    if cfg.data.seq_len is not None and cfg.data.seq_len != data.seq_len:
        raise UserError(
            f"data.seq_len is {cfg.data.seq_len} but {cfg.data.path} was prepared with seq_len {data.seq_len}"
        )
    domains = data.domains
    l0 = lagrangian = None
    if pruning:
        l0 = L0Module(model.args, cfg.pruning.target).to(env.device)
        l0.reset_parameters(torch.Generator().manual_seed(loop.seed))
        lagrangian = LagrangianConstraint(l0.specs).to(env.device)

    # --- 2. weights, reference losses, sampler, optimizer, resume --------------------------------
    previous = _previous_run_state(source.path) if not pruning else {}
    if cfg.data.initial_weights is not None:
        weights = weights_by_domain(cfg.data.initial_weights, domains, "data.initial_weights")
    elif previous.get("domain_weights") and set(previous["domain_weights"]) == set(domains):
        weights = weights_by_domain(previous["domain_weights"], domains, "the pruning run's final weights")
    else:
        weights = weights_proportional_to([data.num_tokens(d, "train") for d in domains])
    sampler = DomainMixtureSampler(
        domains, [data.num_sequences(d, "train") for d in domains], weights, loop.seed
    )

    trainable = Trainable(model, l0, lagrangian)
    trainable.model = wrap_model(model, env, cfg.distributed.activation_checkpointing, bf16)
    optimizer = build_optimizer(
        model.parameters(),
        cfg.optim,
        log_alpha=l0.parameters() if l0 is not None else (),
        lambdas=lagrangian.parameters() if lagrangian is not None else (),
        pruning=cfg.pruning if pruning else None,
    )

    def evaluate(masks: Masks | None) -> dict[str, float]:
        return domain_losses(
            trainable.model,
            data,
            batch_size=cfg.data.eval_batch_size,
            masks=masks,
            max_sequences=cfg.data.max_eval_sequences,
            device=env.device,
            autocast_dtype=autocast_dtype,
        )

    start_step, tokens_seen, history = 0, 0, []
    checkpoints = ckpt.list_checkpoints(run_dir) if resume else []
    if resume and not checkpoints:
        raise UserError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    if checkpoints:
        state = ckpt.load_checkpoint(checkpoints[-1], trainable, optimizer)
        if state["global_batch_size"] != loop.global_batch_size:
            raise UserError(
                f"the checkpoint was trained with global_batch_size {state['global_batch_size']}; "
                f"resume with the same value (got {loop.global_batch_size})"
            )
        sampler.load_state_dict(state["sampler"])
        start_step, tokens_seen, history = state["step"], state["tokens"], state["history"]
        reference = state["reference_losses"]
    else:
        reference = read_reference_losses(cfg.data.reference_losses, domains, previous)
        if reference is None:  # "source": the model's own loss before any training, unmasked
            reference = evaluate(None)
    reference_list = [reference[d] for d in domains]

    # --- 3. the loop -----------------------------------------------------------------------------
    accum = loop.global_batch_size // (loop.micro_batch_size * env.world_size)
    if accum < 1 or loop.global_batch_size % (loop.micro_batch_size * env.world_size):
        raise UserError(
            f"train.global_batch_size ({loop.global_batch_size}) must be a multiple of micro_batch_size "
            f"({loop.micro_batch_size}) × ranks ({env.world_size})"
        )
    warmup_steps = round(cfg.pruning.lagrangian_warmup_fraction * loop.steps) if pruning else 0
    tokens_per_step = loop.global_batch_size * data.seq_len
    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=start_step if checkpoints else None)
    bar = tqdm(
        total=loop.steps, initial=start_step, disable=not progress, desc="prune" if pruning else "train"
    )
    last_eval: dict[str, float] = history[-1]["eval_loss"] if history else {}
    record: dict[str, Any] = {}

    for step in range(start_step, loop.steps):
        t0 = time.perf_counter()
        multiplier = lr_multiplier(step, loop.steps, cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio)
        set_learning_rates(optimizer, multiplier)
        items = rank_slice(sampler.next_global_batch(loop.global_batch_size), env.rank, env.world_size)
        lm_loss_sum = 0.0
        for m in range(accum):
            micro = items[m * loop.micro_batch_size : (m + 1) * loop.micro_batch_size]
            ids = _gather(data, domains, micro).to(env.device)  # (micro_batch, seq_len)
            masks = None
            if l0 is not None:
                l0.clamp_()
                masks = l0.sample(mask_generator(loop.seed, step, env.rank * accum + m))
            with gradient_sync(trainable.model, env, sync=m == accum - 1):
                with torch.autocast(
                    env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    logits = trainable.model(ids, masks) if masks is not None else trainable.model(ids)
                loss = next_token_loss(logits, ids) / accum
                loss.backward()
            lm_loss_sum += loss.item()

        lag_loss, lag_parts, target = torch.zeros(()), {}, {}
        if l0 is not None:
            target = warmed_up_target(l0.target_sparsity(), step, warmup_steps)
            lag_loss, lag_parts = lagrangian(l0.expected_sparsity(), target)
            lag_loss.backward()
            average_gradients([*l0.parameters(), *lagrangian.parameters()], env)
        grad_norm = _clip(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step

        # --- logging --------------------------------------------------------------------------
        (lm_loss,) = all_reduce_sum([lm_loss_sum / env.world_size], env)
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "tokens": tokens_seen,
            "loss": lm_loss + float(lag_loss.detach()),
            "lm_loss": lm_loss,
            "lag_loss": float(lag_loss.detach()),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / elapsed,
        }
        if l0 is not None:
            with torch.no_grad():
                for name, s_hat in l0.expected_sparsity().items():
                    record[f"expected_sparsity/{name}"] = s_hat.mean().item()
                    record[f"target_sparsity/{name}"] = target[name]
                    record[f"lambda1/{name}"] = lagrangian.lambda1[name].item()
                    record[f"lambda2/{name}"] = lagrangian.lambda2[name].item()
                    record[f"lag_loss/{name}"] = lag_parts[name].item()
                record["expected_params"] = l0.expected_num_params().item()
        record.update({f"domain_weight/{d}": w for d, w in zip(domains, sampler.weights)})

        # --- 4. evaluation and dynamic batch loading ------------------------------------------
        if (step + 1) % loop.eval_interval == 0 or step + 1 == loop.steps:
            eval_masks = l0.deterministic("expected") if l0 is not None else None
            trainable.model.eval()
            last_eval = evaluate(eval_masks)
            trainable.model.train()
            losses = [last_eval[d] for d in domains]
            if cfg.data.dynamic:
                sampler.set_weights(
                    update_domain_weights(
                        sampler.weights,
                        losses,
                        reference_list,
                        eta=cfg.data.eta,
                        smoothing=cfg.data.smoothing,
                        clip_excess=cfg.data.clip_excess,
                    )
                )
            history.append(
                {"step": step + 1, "eval_loss": last_eval, "weights": dict(zip(domains, sampler.weights))}
            )
            record.update({f"eval_loss/{d}": v for d, v in last_eval.items()})
            record.update({f"reference_loss/{d}": reference[d] for d in domains})
        metrics.write(record)
        bar.update(1)
        postfix = {"loss": f"{record['lm_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if l0 is not None:
            postfix["params"] = f"{record['expected_params'] / 1e6:.2f}M→{_target_params(l0) / 1e6:.2f}M"
        bar.set_postfix(postfix)

        # --- 5. checkpoints -------------------------------------------------------------------
        if (step + 1) % loop.save_interval == 0 or step + 1 == loop.steps:
            trainer_state = {
                "step": step + 1,
                "tokens": tokens_seen,
                "world_size": env.world_size,
                "global_batch_size": loop.global_batch_size,
                "sampler": sampler.state_dict(),
                "history": history,
                "reference_losses": reference,
                "domains": domains,
            }
            ckpt.save_checkpoint(
                run_dir, step + 1, trainable, optimizer, trainer_state, loop.keep_checkpoints
            )
    bar.close()
    metrics.close()

    final_weights = dict(zip(domains, sampler.weights))
    if l0 is not None:
        final = l0.deterministic("target")
        assert_same_on_all_ranks({n: getattr(final, n) for n in final.names()}, env)
        if env.is_main:
            save_final_masks(run_dir, l0)
    barrier(env)
    return RunResult(
        run_dir=run_dir,
        steps=loop.steps,
        final_loss=record.get("lm_loss", math.nan),
        eval_losses=last_eval,
        domain_weights=final_weights,
    )


def _gather(data, domains: list[str], items: list[tuple[int, int]]) -> torch.Tensor:
    """Token ids (len(items), seq_len) of (domain index, sequence index) pairs, in order."""
    rows = [data.sequences(domains[d], "train", [i]) for d, i in items]
    return torch.cat(rows, dim=0)


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _target_params(l0: L0Module) -> float:
    from sheared.model.args import parameter_counts

    return parameter_counts(l0.target.model_args(l0.source))["num_params"]


def _previous_run_state(model_path: Path) -> dict[str, Any]:
    """The previous run's domain weights and reference losses, kept next to an exported model."""
    path = model_path / RUN_STATE_FILE if model_path.is_dir() else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def save_final_masks(run_dir: Path, l0: L0Module) -> Path:
    """Write the final exact-target masks: tensors (`masks.pt`) and a readable summary (`masks.json`).

    `masks.pt` holds `{"masks": {name: binary tensor}, "log_alpha": {name: tensor}, "target": {...},
    "source": {...}}`; `masks.json` lists the kept layers, per kept layer its KV heads, query heads
    and intermediate size, and the kept hidden size, plus the expected-vs-target gap.
    """
    out = run_dir / MASKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    masks = l0.deterministic("target")
    tensors = {name: getattr(masks, name).cpu() for name in masks.names()}
    torch.save(
        {
            "masks": tensors,
            "log_alpha": {k: v.detach().cpu() for k, v in l0.log_alpha.items()},
            "target": vars(l0.target),
            "source": vars(l0.source),
        },
        out / MASKS_FILE,
    )
    with torch.no_grad():
        gap = {
            name: float(s.mean() - l0.specs[name].target_sparsity)
            for name, s in l0.expected_sparsity().items()
        }
    summary = kept_structure(l0.source, masks).summary()
    summary["expected_minus_target_sparsity"] = gap
    summary["target"] = vars(l0.target)
    (out / MASKS_SUMMARY).write_text(json.dumps(summary, indent=1))
    return out
