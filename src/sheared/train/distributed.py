"""Data parallelism under torchrun: process group, device, DDP or FSDP2, activation checkpointing.

The model file knows nothing of this; the loop asks for an environment and a wrapped model.
The L0 module and the Lagrange multipliers are small and stay replicated: their gradients are
all-reduced (averaged) by `average_gradients`, like DDP does for the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sheared.errors import UserError
from sheared.precision import Precision
from sheared.train.config import DistributedConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, device, and the data-parallel strategy."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str
    """`none`, `ddp` or `fsdp`."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """`train.device` (`auto`: CUDA when available; `cpu`; `cuda`) as this process's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available; use device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg: DistributedConfig, device: str) -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK) and pick a device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise UserError(
            f"distributed.strategy is none but torchrun started {world} processes; use ddp or fsdp"
        )
    under_torchrun = "WORLD_SIZE" in os.environ
    if (world > 1 or (strategy == "fsdp" and under_torchrun)) and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=strategy)


CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def _checkpoint_layers(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def _fully_shard(model: nn.Module, precision: Precision) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise UserError("distributed.strategy fsdp needs torchrun (a process group), even for one process")
    policy = MixedPrecisionPolicy(param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _local_rows(param: torch.Tensor, env: DistEnv) -> slice | None:
    """The rows of the full tensor that this rank's FSDP2 shard holds (dim-0 sharding, torch.chunk sizes)."""
    if not hasattr(param, "to_local"):
        return None
    from torch.distributed.tensor import Shard

    assert tuple(param.placements) == (Shard(0),), param.placements
    rows = param.shape[0]
    chunk = -(-rows // env.world_size)  # ceil
    start = min(env.rank * chunk, rows)
    return slice(start, min(start + chunk, rows))


def load_sharded(
    spec: str, env: DistEnv, activation_checkpointing: bool, precision: Precision, frozen: bool = False
):
    """The source built on the meta device, sharded with FSDP2, materialised empty, and filled by each
    rank with its own rows only (read by slice from the safetensors files): no rank ever holds the
    whole model. Returns a `Source` whose model is already wrapped."""
    from sheared.model import CausalLM, Source, load_tokenizer, read_source_config
    from sheared.model.families import get_family
    from sheared.model.loading import TensorReader

    args, hf_config, path = read_source_config(spec)
    with torch.device("meta"):
        model = CausalLM(args)
    if activation_checkpointing:
        _checkpoint_layers(model)
    _fully_shard(model, precision)
    model.to_empty(device=env.device)
    reader = TensorReader(args, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.replace(CHECKPOINT_WRAPPER_PREFIX, "")
            local = param.to_local() if hasattr(param, "to_local") else param
            local.copy_(reader.read(key, _local_rows(param, env)).to(local.dtype))
    if frozen:
        model.eval().requires_grad_(False)
    try:
        tokenizer = load_tokenizer(spec)
    except UserError:  # a model directory without tokenizer files, as load_source allows
        tokenizer = None
    return Source(
        model=model, tokenizer=tokenizer, family=get_family(args.family), hf_config=hf_config, path=path
    )


def wrap_model(
    model: nn.Module, env: DistEnv, activation_checkpointing: bool, precision: Precision
) -> nn.Module:
    """Activation checkpointing per decoder layer, then DDP or FSDP2 (`fully_shard` per layer, then root).

    Under FSDP2 in bf16, parameters are gathered in bf16 for compute while the sharded fp32
    parameters stay the master weights (gradients reduced in fp32). Runs loaded by `load_sharded`
    are sharded already and do not come here.
    """
    if activation_checkpointing:
        _checkpoint_layers(model)
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not dist.is_initialized():  # one process: nothing to synchronise
            return model
        return DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )
    if env.strategy == "fsdp":
        _fully_shard(model, precision)
    return model


def gradient_sync(model: nn.Module, env: DistEnv, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-batches (all but the last of a step)."""
    if env.strategy == "ddp" and hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if env.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def average_gradients(params: Iterable[nn.Parameter], env: DistEnv) -> None:
    """All-reduce (mean) the gradients of replicated parameters that no wrapper synchronises."""
    if not env.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if env.device.type == "cuda" else dist.ReduceOp.SUM)
            if env.device.type != "cuda":  # gloo has no AVG
                p.grad /= env.world_size


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum floats over ranks (for logging)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor, env: DistEnv) -> None:
    """Sum a tensor over ranks in place (it may live on the CPU while the backend is NCCL)."""
    if not env.distributed:
        return
    on_device = t.to(env.device)
    dist.all_reduce(on_device)
    t.copy_(on_device.to(t.device))


def assert_same_on_all_ranks(tensors: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Check (collectively) that every rank holds the same tensors, e.g. the final masks."""
    if not env.distributed:
        return
    for name, t in tensors.items():
        low, high = t.detach().clone(), t.detach().clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        assert torch.equal(low, high), f"the deterministic {name} mask differs between ranks"


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


GLOO_RETIRE_SECONDS = 0.2


def shutdown(env: DistEnv) -> None:
    """End the process group. Gloo's worker threads retire finished work, and the Python tensors it
    holds, under the GIL; DDP's reducer later joins those threads in its destructor while holding the
    GIL, which deadlocks if a retirement is still pending (seen after the last all-reduce of a run). A
    short sleep here gives them the GIL first; no collective, so a rank that failed cannot hang it."""
    if env.distributed and dist.is_initialized():
        time.sleep(GLOO_RETIRE_SECONDS)
        dist.destroy_process_group()
