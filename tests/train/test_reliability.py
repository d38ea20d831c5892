"""Nothing lost, nothing silent: divergence stops a run, damaged checkpoints fall back, a refused
resume writes nothing, a run that died before its first checkpoint restarts, full disks are one line."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil

import pytest
import torch

from sheared.cli import main
from sheared.data.sampler import DomainMixtureSampler
from sheared.errors import UserError
from sheared.run_dir import RunDir, read_metrics
from sheared.train import checkpoint as ckpt
from sheared.train.loop import DivergenceError, run

TIMING = "tokens_per_s"


class Crash(RuntimeError):
    pass


SMALL = ["data.max_eval_sequences=2", "train.eval_interval=2"]


def _same_metrics(a_dir, b_dir) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != TIMING} == {k: v for k, v in rb.items() if k != TIMING}


def _error_lines(capsys) -> list[str]:
    """The `sheared: error:` lines of stderr (progress bars may share stderr)."""
    return [line for line in capsys.readouterr().err.splitlines() if "sheared: error:" in line]


def _argv(cfg, run_dir, *extra) -> list[str]:
    return [
        "prune",
        "--config",
        "configs/tiny/prune.yaml",
        "--run-dir",
        str(run_dir),
        f"source={cfg.source}",
        f"data.path={cfg.data.path}",
        "data.auto_prepare=null",
        *extra,
    ]


# --- divergence -------------------------------------------------------------------------------------


def test_divergence_stops_the_run_and_writes_nothing_non_finite(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    argv = _argv(cfg, tmp_path / "run", "optim.lr=1e20", "data.dynamic=false", "train.steps=10")
    argv += ["train.save_interval=1", *SMALL]
    assert main(argv) == 2
    (err,) = _error_lines(capsys)
    assert "lower optim.lr (now 1e+20)" in err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert step <= 3
    assert "the last good checkpoint is" in err or "no checkpoint was written yet" in err
    assert not RunDir(tmp_path / "run").masks.exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, step))
    for path in ckpt.list_checkpoints(tmp_path / "run"):  # every checkpoint written is finite
        assert ckpt.checkpoint_problem(path) is None
        assert int(path.name.split("_")[1]) < step


def test_divergence_error_is_a_user_error():
    assert issubclass(DivergenceError, UserError)


def test_a_dead_run_warns(tiny_config, tmp_path, capsys):
    # the paper's controller: under the projection the same learning rate overflows instead, and the
    # divergence guard stops the run (tests above)
    cfg = tiny_config(
        "optim.lr=1e6", "train.steps=8", "train.dead_steps=3", "pruning.controller=lagrangian", *SMALL
    )
    run(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    dead = [r for r in records if abs(r["lm_loss"] - math.log(49152)) < 1e-3 and r["grad_norm"] < 1e-8]
    assert len(dead) >= 3  # the model was destroyed into uniform predictions ...
    assert "predicts uniformly and no longer learns" in err  # ... and the run said so


# --- checkpoints ------------------------------------------------------------------------------------


DAMAGES = ["truncate", "delete", "flip", "metadata", "trainer_state", "manifest"]


def _damage(folder, how: str) -> None:
    distcp = sorted(folder.glob("*.distcp"))[0]
    if how == "truncate":
        with open(distcp, "r+b") as f:
            f.truncate(distcp.stat().st_size // 2)
    elif how == "delete":
        distcp.unlink()
    elif how == "flip":
        data = bytearray(distcp.read_bytes())
        data[len(data) // 2] ^= 0xFF
        distcp.write_bytes(bytes(data))
    elif how == "metadata":
        (folder / ".metadata").unlink()
    elif how == "trainer_state":
        path = folder / ckpt.TRAINER_STATE
        path.write_text(path.read_text()[:20])
    else:
        (folder / ckpt.MANIFEST).write_text("{")


@pytest.fixture(scope="module")
def four_steps(tiny_assets, tmp_path_factory):
    """A 6-step run that crashed in step 5 (checkpoints at steps 2 and 4), and the same run uninterrupted."""
    from sheared.config import load_config
    from sheared.train.config import PruneConfig

    root = tmp_path_factory.mktemp("four")
    shutil.copytree(tiny_assets / "prepared", root / "prepared")

    def cfg(*extra):
        overrides = [
            f"source={tiny_assets / 'source'}",
            f"data.path={root / 'prepared'}",
            "data.auto_prepare=null",
        ]
        return load_config(
            PruneConfig, "configs/tiny/prune.yaml", [*overrides, "train.save_interval=2", *SMALL, *extra]
        )

    real_next = DomainMixtureSampler.next_global_batch

    def crash_at_step_5(self, size):
        if self.step == 4:
            raise Crash
        return real_next(self, size)

    DomainMixtureSampler.next_global_batch = crash_at_step_5
    try:
        with pytest.raises(Crash):
            run(cfg("train.steps=6"), root / "run", progress=False)
    finally:
        DomainMixtureSampler.next_global_batch = real_next
    run(cfg("train.steps=6"), root / "full", progress=False)
    return root, cfg


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_falls_back(four_steps, tmp_path, how, capsys):
    root, _ = four_steps
    shutil.copytree(root / "run", tmp_path / "run")
    newest = ckpt.list_checkpoints(tmp_path / "run")[-1]
    _damage(newest, how)
    found = ckpt.newest_intact_checkpoint(tmp_path / "run")
    assert found.name == "step_000002"
    err = capsys.readouterr().err
    assert "checkpoint step_000004 is damaged" in err and "moved to step_000004.damaged" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_000002"]


def test_resume_after_a_damaged_checkpoint_equals_an_uninterrupted_run(four_steps, tmp_path, capsys):
    root, cfg = four_steps
    shutil.copytree(root / "run", tmp_path / "run")
    _damage(ckpt.list_checkpoints(tmp_path / "run")[-1], "truncate")
    with open(RunDir(tmp_path / "run").metrics, "a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a metrics line
    run(cfg("train.steps=6"), tmp_path / "run", resume=True, progress=False)
    assert "checkpoint step_000004 is damaged" in capsys.readouterr().err
    _same_metrics(root / "full", tmp_path / "run")
    a = torch.load(RunDir(root / "full").masks, weights_only=True)
    b = torch.load(RunDir(tmp_path / "run").masks, weights_only=True)
    assert all(torch.equal(a["log_alpha"][k], b["log_alpha"][k]) for k in a["log_alpha"])


def test_refused_resume_leaves_the_run_untouched(four_steps, tmp_path, capsys):
    root, _ = four_steps
    shutil.copytree(root / "run", tmp_path / "run")
    before = {p.name: p.read_bytes() for p in tmp_path.joinpath("run").iterdir() if p.is_file()}
    cfg = four_steps[1]("train.steps=6")
    argv = [
        "prune",
        "--resume",
        *_argv(cfg, tmp_path / "run", "train.steps=6", "train.global_batch_size=4")[1:],
    ]
    argv += ["train.save_interval=2", *SMALL]
    assert main(argv) == 2
    assert "trained with global_batch_size 8" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in tmp_path.joinpath("run").iterdir() if p.is_file()}
    assert after == before  # config.yaml byte-identical, no config.resume-N.yaml, metrics unchanged


def test_keep_checkpoints_holds_after_resuming_a_finished_run(four_steps, tmp_path):
    root, cfg = four_steps
    shutil.copytree(root / "full", tmp_path / "run")
    assert len(ckpt.list_checkpoints(tmp_path / "run")) == 2
    run(cfg("train.steps=6", "train.keep_checkpoints=1"), tmp_path / "run", resume=True, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_000006"]
    assert (tmp_path / "run" / "config.resume-1.yaml").is_file()


def test_a_run_that_died_before_its_first_checkpoint_restarts(tiny_config, tmp_path, monkeypatch, capsys):
    overrides = ["train.steps=3", "train.save_interval=3", *SMALL]
    real_next = DomainMixtureSampler.next_global_batch

    def crash_at_step_2(self, size):
        if self.step == 2:
            raise Crash
        return real_next(self, size)

    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", crash_at_step_2)
    with pytest.raises(Crash):
        run(tiny_config(*overrides), tmp_path / "run", progress=False)
    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", real_next)
    with pytest.raises(
        UserError, match="stopped before its first checkpoint; pass --resume to start it again"
    ):
        run(tiny_config(*overrides), tmp_path / "run", progress=False)
    run(tiny_config(*overrides), tmp_path / "run", resume=True, progress=False)
    assert "holds no complete checkpoint; starting it again from step 0" in capsys.readouterr().err
    run(tiny_config(*overrides), tmp_path / "fresh", progress=False)
    _same_metrics(tmp_path / "fresh", tmp_path / "run")


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_tmp(
    tiny_config, tmp_path, monkeypatch, capsys
):
    import torch.distributed.checkpoint as dcp

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(kwargs.get("checkpoint_id")))

    monkeypatch.setattr(dcp, "save", no_space)
    cfg = tiny_config()
    assert main(_argv(cfg, tmp_path / "run", "train.steps=2", "train.save_interval=1", *SMALL)) == 2
    (err,) = _error_lines(capsys)
    assert "No space left on device" in err and "MiB" in err and "--resume" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


# --- one line each ------------------------------------------------------------------------------------


def test_mistakes_are_one_line(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    cases = {
        "is not a YAML value": _argv(cfg, tmp_path / "a", "train.steps=[1,"),
        "is a directory": ["prune", "--config", "configs/tiny", "--run-dir", str(tmp_path / "b")],
        "data.max_eval_sequences must be at least 1": _argv(
            cfg, tmp_path / "c", "data.max_eval_sequences=-1"
        ),
        "the target equals the source": _argv(
            cfg,
            tmp_path / "d",
            "pruning.target.num_hidden_layers=4",
            "pruning.target.hidden_size=64",
            "pruning.target.num_attention_heads=4",
            "pruning.target.num_key_value_heads=2",
            "pruning.target.intermediate_size=128",
        ),
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (expected, err)
        assert not (tmp_path / argv[4]).exists() or not any((tmp_path / argv[4]).iterdir())


def test_bad_sources_are_one_line(tiny_config, tiny_assets, tmp_path, capsys):
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_assets / "source", bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    config["hidden_size"], config["head_dim"] = 66, None
    (bad_config / "config.json").write_text(json.dumps(config))
    assert main(["info", str(bad_config)]) == 2
    err = capsys.readouterr().err
    assert "is not a valid llama config" in err and "66" in err and err.count("\n") == 1

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_assets / "source", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    cfg = tiny_config()
    assert main(_argv(cfg, tmp_path / "run", f"source={truncated}")) == 2
    err = capsys.readouterr().err
    assert "is not a readable safetensors file" in err and err.count("\n") == 1


def test_token_ids_outside_the_vocabulary_are_one_line(tiny_config, tmp_path, capsys):
    cfg = tiny_config("data.verify=size")
    token_file = tmp_path / "prepared" / "code.eval.bin"  # read first: the reference losses
    data = bytearray(token_file.read_bytes())
    data[0:2] = (65000).to_bytes(2, "little")  # uint16 ids; the vocabulary has 49,152
    token_file.write_bytes(bytes(data))
    argv = _argv(cfg, tmp_path / "run", "data.verify=size", "train.steps=2", *SMALL)
    assert main(argv) == 2
    (err,) = _error_lines(capsys)
    assert "holds token id 65000, outside the tokenizer's vocabulary of 49152" in err
