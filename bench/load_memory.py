"""Peak host memory of loading a ~1B LLaMA source under FSDP2 on 1 and 2 ranks, and of exporting
a pruned run of it.

    .venv/bin/python bench/load_memory.py [--root runs/bench-load-memory] [--layers 20]

1. A random ~1B-parameter LLaMA (hidden 2048, 32 heads in 8 KV groups, intermediate 5632, SmolLM2's
   tokenizer, tied) is written once to ROOT/source (float32 safetensors, about 4 GB).
2. Loading: `torchrun --nproc_per_node N` (N = 1, 2; gloo on CPU) processes each load it the way a
   run does (`load_sharded`: meta model, fully_shard, to_empty, each rank reads its rows), and, for
   comparison, the full way every rank did before (`load_source` + `fully_shard`). Every rank
   reports its peak resident memory (ru_maxrss); the table shows the largest rank and the sum.
3. Export: a one-shot (`random`) pruning run of the source to about half its non-embedding size is
   exported with `sheared export` in a fresh process, whose peak resident memory is measured.

Goals: the largest rank's peak with 2 processes <= 0.6x the 1-process peak; the export's peak <=
1.3x the source's float32 bytes plus the target's. Peaks include the ~0.5 GB of the imported
libraries, which are reported too (`baseline`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

KIB = 1024
GIB = 2**30
GOAL_RANKS, GOAL_EXPORT = 0.6, 1.3
TINY_CONFIG = "configs/tiny/prune.yaml"


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def _source_init(layers: int):
    from sheared.model.random_source import SourceInit

    return SourceInit(
        family="llama",
        num_hidden_layers=layers,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=5632,
        tie_word_embeddings=True,
        tokenizer="smollm2-135m",
        seed=0,
    )


def worker(source: str, mode: str) -> None:
    """One rank under torchrun: load the source `mode`'s way; rank 0 prints every rank's peak."""
    import torch.distributed as dist

    from sheared.model import load_source
    from sheared.precision import FP32
    from sheared.train.config import DistributedConfig
    from sheared.train.distributed import _fully_shard, init_distributed, load_sharded, shutdown

    env = init_distributed(DistributedConfig(strategy="fsdp"), "cpu")
    baseline = _peak_bytes()
    if mode == "sharded":
        load_sharded(source, env, activation_checkpointing=False, precision=FP32)
    else:
        model = load_source(source, with_tokenizer=False).model
        _fully_shard(model, FP32)
    peaks = [None] * env.world_size
    dist.all_gather_object(peaks, {"peak": _peak_bytes(), "baseline": baseline})
    if env.is_main:
        print(json.dumps(peaks))
    shutdown(env)


def _launch(n: int, source: Path, mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1"]
    cmd += ["--master_port=29581", __file__, "--worker", str(source), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _export_peak(root: Path, source: Path) -> tuple[float, dict]:
    """Prune the source one-shot (random masks) to about half its size, export, measure the export."""
    from sheared.cli import main as cli

    run_dir, out = root / "oneshot", root / "export"
    if not (run_dir / "final_state.json").is_file():
        target = ["pruning.target.num_hidden_layers=14", "pruning.target.hidden_size=1536"]
        target += ["pruning.target.num_attention_heads=24", "pruning.target.num_key_value_heads=6"]
        target += ["pruning.target.intermediate_size=4096"]
        args = [
            "prune",
            "--config",
            TINY_CONFIG,
            "--run-dir",
            str(run_dir),
            f"source={source}",
            "source_init=null",
        ]
        args += [f"data.path={root / 'prepared'}", f"data.auto_prepare.corpus_dir={root / 'corpus'}"]
        args += ["pruning.method=random", "data.max_eval_sequences=1", *target]
        assert cli(args) == 0
    code = (
        "import json, resource, sys; from sheared.cli import main; "
        f"rc = main(['export', {str(run_dir)!r}, '--out', {str(out)!r}, '--force']); "
        "print(json.dumps({'rc': rc, 'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, done.stderr[-2000:]
    return result["peak"], json.loads((out / "export_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/bench-load-memory")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "MODE"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        worker(*ns.worker)
        return
    from sheared.hardware import machine_summary
    from sheared.model.args import parameter_counts
    from sheared.model.random_source import ensure_source

    root = Path(ns.root)
    init = _source_init(ns.layers)
    ensure_source(init, root / "source")
    from sheared.model import read_source_config

    args = read_source_config(root / "source")[0]
    source_bytes = parameter_counts(args)["num_params"] * 4
    print(f"machine: {machine_summary()}")
    print(
        f"source: {parameter_counts(args)['num_params'] / 1e9:.2f}B parameters, {source_bytes / GIB:.2f} GiB in float32"
    )
    rows = {}
    for mode in ("sharded", "full"):
        for n in (1, 2):
            peaks = _launch(n, root / "source", mode)
            rows[(mode, n)] = (
                max(p["peak"] for p in peaks),
                sum(p["peak"] for p in peaks),
                peaks[0]["baseline"],
            )
            largest, total, base = rows[(mode, n)]
            print(
                f"load {mode:>7}, {n} rank(s): largest rank {largest / GIB:5.2f} GiB, all ranks {total / GIB:5.2f} GiB (baseline {base / GIB:.2f})"
            )
    ratio = rows[("sharded", 2)][0] / rows[("sharded", 1)][0]
    print(f"largest rank, 2 vs 1 process (sharded load): {ratio:.2f} (goal <= {GOAL_RANKS})")
    peak, report = _export_peak(root, root / "source")
    target_bytes = report["exported_num_params"] * 4
    limit = GOAL_EXPORT * source_bytes + target_bytes
    print(
        f"export: peak {peak / GIB:.2f} GiB; source {source_bytes / GIB:.2f} GiB + target {target_bytes / GIB:.2f} GiB; "
        f"goal <= {limit / GIB:.2f} GiB ({peak / limit:.2f} of it); verified {report['verified']}"
    )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
