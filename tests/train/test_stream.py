"""One data stream (SPEC §11): continued pretraining of a pruning run's export carries on the pruning
run's sampler, so it reads no sequence the pruning run read (until a domain runs out), on 1 and on
2 processes. The sequences each run read are replayed from its logged per-step domain weights; on
one process they are also recorded as the loop gathers them, which checks the replay."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import free_port, subprocess_env

from sheared.config import load_config
from sheared.data.sampler import DomainMixtureSampler
from sheared.data.tokens import PreparedData
from sheared.export import export_run
from sheared.run_dir import DOMAIN_WEIGHT, read_metrics, read_run_state
from sheared.train import loop
from sheared.train.config import TrainConfig

PRUNE = ["train.steps=6", "train.eval_interval=3", "train.save_interval=6", "data.max_eval_sequences=2"]
TRAIN = ["train.steps=6", "train.eval_interval=3", "train.save_interval=6", "data.max_eval_sequences=2"]


def _replay(
    run_dir, data: PreparedData, seed: int, batch: int, carried: dict | None
) -> list[tuple[int, int]]:
    """The (domain, sequence) pairs a run read, from its logged weights (the weights of each step's draws)."""
    sizes = [data.num_sequences(d, "train") for d in data.domains]
    sampler = DomainMixtureSampler(data.domains, sizes, [1 / len(sizes)] * len(sizes), seed)
    if carried is not None:
        sampler.load_state_dict(carried)
    items = []
    for record in read_metrics(run_dir):
        sampler.set_weights([record[DOMAIN_WEIGHT + d] for d in data.domains])
        items += sampler.next_global_batch(batch)
    return items


def _launch(nproc: int, command: str, config: str, run_dir, overrides: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
    ]
    cmd += [f"--master_port={free_port()}", "-m", "sheared", command, "--config", config]
    done = subprocess.run(
        [*cmd, "--run-dir", str(run_dir), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _check_disjoint(prune_dir, train_dir, export_dir, data, seed, batch):
    carried = read_run_state(export_dir)["sampler"]
    pruned = _replay(prune_dir, data, seed, batch, None)
    continued = _replay(train_dir, data, seed, batch, carried)
    assert len(pruned) == 6 * batch and len(continued) == 6 * batch
    assert len(set(pruned)) == len(pruned) and len(set(continued)) == len(continued)  # no domain ran out
    assert not set(pruned) & set(continued)
    return pruned, continued


def test_continued_pretraining_reads_no_sequence_of_the_pruning_run(
    tiny_config, tmp_path, monkeypatch, capsys
):
    prune_cfg = tiny_config(*PRUNE)
    gathered: list[list[tuple[int, int]]] = []
    original = loop._gather
    monkeypatch.setattr(
        loop, "_gather", lambda data, items: gathered[-1].extend(items) or original(data, items)
    )
    gathered.append([])
    loop.run(prune_cfg, tmp_path / "prune", progress=False)
    export_run(tmp_path / "prune", tmp_path / "pruned")
    train_cfg = load_config(
        TrainConfig,
        "configs/tiny/train.yaml",
        [f"model={tmp_path / 'pruned'}", f"data.path={prune_cfg.data.path}", *TRAIN],
    )
    gathered.append([])
    capsys.readouterr()
    loop.run(train_cfg, tmp_path / "train")
    assert "data stream: the pruning run's stream at its step 6" in capsys.readouterr().out
    data = PreparedData.open(prune_cfg.data.path, verify="size")
    pruned, continued = _check_disjoint(
        tmp_path / "prune", tmp_path / "train", tmp_path / "pruned", data, 0, 8
    )
    assert gathered == [pruned, continued]  # the replay is what the loop read


def test_the_stream_continues_on_two_processes(tiny_assets, tmp_path):
    data_path = tiny_assets / "prepared"
    common = [f"data.path={data_path}", "data.auto_prepare=null", "distributed.strategy=ddp"]
    _launch(
        2,
        "prune",
        "configs/tiny/prune.yaml",
        tmp_path / "prune",
        [f"source={tiny_assets / 'source'}", *common, *PRUNE],
    )
    export_run(tmp_path / "prune", tmp_path / "pruned")
    train = [f"model={tmp_path / 'pruned'}", *common, *TRAIN]
    _launch(2, "train", "configs/tiny/train.yaml", tmp_path / "train", train)
    data = PreparedData.open(data_path, verify="size")
    _check_disjoint(tmp_path / "prune", tmp_path / "train", tmp_path / "pruned", data, 0, 8)


def test_a_stream_of_another_seed_is_not_continued(tiny_assets):
    from sheared.train.setup import initial_sampler

    data = PreparedData.open(tiny_assets / "prepared", verify="size")
    cfg = load_config(TrainConfig, "configs/tiny/train.yaml", [f"data.path={tiny_assets / 'prepared'}"])
    sizes = [data.num_sequences(d, "train") for d in data.domains]
    other = DomainMixtureSampler(data.domains, sizes, [0.5, 0.5], seed=7)
    other.next_global_batch(8)
    sampler, line = initial_sampler(cfg, data, {"sampler": other.state_dict()})
    assert sampler.step == 0 and line.startswith("step 0 of a new stream") and "seed" in line
    same = DomainMixtureSampler(data.domains, sizes, [0.5, 0.5], seed=0)
    same.next_global_batch(8)
    sampler, line = initial_sampler(
        cfg, data, {"sampler": same.state_dict(), "domain_weights": dict(zip(data.domains, [0.25, 0.75]))}
    )
    assert sampler.step == 1 and sampler.state_dict()["position"] == same.state_dict()["position"]
    assert sampler.weights == pytest.approx([0.25, 0.75])  # the pruning run's final weights
    assert line.startswith("the pruning run's stream at its step 1")
