"""Run under torchrun: load a source with `load_sharded` (FSDP2), gather every parameter, save them.

python -m torch.distributed.run --nproc_per_node 2 tests/distributed/sharded_load_worker.py SOURCE OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from sheared.precision import FP32
from sheared.train.config import DistributedConfig
from sheared.train.distributed import init_distributed, load_sharded, shutdown


def main(source: str, out: str) -> None:
    env = init_distributed(DistributedConfig(strategy="fsdp"), "cpu")
    try:
        model = load_sharded(source, env, activation_checkpointing=True, precision=FP32).model
        local_rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
        full = {
            n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor() for n, p in model.named_parameters()
        }
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, local_rows)
        if env.is_main:
            torch.save({"params": full, "local_rows": gathered}, out)
    finally:
        shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
