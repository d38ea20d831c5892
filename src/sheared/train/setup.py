"""Set-up shared by learned (`loop`) and one-shot (`oneshot`) runs: the model and its data, the
initial domain sampler, and what a finished run reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sheared.data.dbl import weights_by_domain, weights_proportional_to
from sheared.data.prepare import ensure_prepared
from sheared.data.sampler import DomainMixtureSampler
from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.model import Source, load_source
from sheared.model.args import describe
from sheared.model.random_source import ensure_source
from sheared.pruning.target import mask_specs
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.distributed import DistEnv, barrier, load_sharded


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
    if isinstance(cfg, PruneConfig) and not mask_specs(source.args, cfg.pruning.target):
        raise UserError(
            f"the target equals the source ({describe(source.args)}) in every dimension; there is nothing to "
            "prune: make at least one of pruning.target's numbers smaller"
        )
    source.model.train()
    return source, data


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
