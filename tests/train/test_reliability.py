"""Nothing lost, nothing silent: divergence stops a run, a dead run ends non-zero, damaged checkpoints
fall back, damaged metrics lines are set aside, a refused resume writes nothing, a finished run is left
as it is, a run with no intact checkpoint starts again only with --restart, full disks are one line."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tree_bytes

from sheared.cli import main
from sheared.data.sampler import DomainMixtureSampler
from sheared.errors import UserError
from sheared.run_dir import RunDir, read_metrics
from sheared.train import checkpoint as ckpt
from sheared.train.loop import DeadRunGuard, DivergenceError, run

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
    assert "the run stopped and wrote nothing from this step (" in err
    assert not RunDir(tmp_path / "run").masks.exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, step))
    for path in ckpt.list_checkpoints(tmp_path / "run"):  # every checkpoint written is finite
        assert ckpt.checkpoint_problem(path) is None
        assert int(path.name.split("_")[1]) < step


def test_divergence_error_is_a_user_error():
    assert issubclass(DivergenceError, UserError)


def test_optimizer_overflow_is_a_divergence(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    assert (
        main(_argv(cfg, tmp_path / "run", "optim.lr=1e38", "train.steps=3", "train.save_interval=1", *SMALL))
        == 2
    )
    (err,) = _error_lines(capsys)
    assert err == (
        "sheared: error: step 1: the optimizer step overflows (value cannot be converted to type float without "
        "overflow); the run stopped and wrote nothing from this step (no checkpoint was written yet; start again "
        "with a lower optim.lr (now 1e+38))"
    )
    assert read_metrics(tmp_path / "run") == [] and ckpt.list_checkpoints(tmp_path / "run") == []


def test_dead_run_threshold_adapts_to_short_runs():
    """dead for train.dead_steps, or 20% of the run when shorter, at least 2 steps; 0: never."""
    ln_v = math.log(49152)
    cases = {(20, 19): 4, (20, 10): 2, (20, 1000): 20, (1, 100): 2, (0, 19): 0, (5, 100): 5}
    for (dead_steps, steps), threshold in cases.items():
        assert DeadRunGuard(dead_steps, steps, ln_v).threshold == threshold, (dead_steps, steps)
    guard = DeadRunGuard(20, 19, ln_v, report=False)
    guard.observe(1, 10.9, 1.0)
    for step in range(2, 5):
        guard.observe(step, ln_v, 0.0)
        assert not guard.ended_dead()
    guard.observe(5, ln_v + 1e-4, 0.0)  # within the tolerance: dead, the 4th step
    assert guard.ended_dead() and guard.count == 4
    guard.observe(6, ln_v, float("nan"))  # a non-finite gradient is no sign of life
    assert guard.count == 5
    guard.observe(7, ln_v + 0.5, 0.0)  # learning again
    assert not guard.ended_dead()


def test_the_last_good_checkpoint_is_one_whose_next_loss_was_finite_and_alive():
    ln_v = math.log(49152)
    guard = DeadRunGuard(20, 100, ln_v, report=False)
    for step, loss, grad in [
        (1, 9.0, 1.0),
        (2, 8.0, 1.0),
        (3, ln_v, 0.0),
        (4, ln_v, 0.0),
        (5, math.nan, 1.0),
    ]:
        guard.observe(step, loss, grad)
    names = [Path(f"run/checkpoints/step_{n:06d}") for n in (1, 2, 3, 4)]
    assert guard.last_good(names) == names[0]  # step_2's weights gave a dead loss at step 3
    assert guard.last_good(names[1:]) is None
    assert guard.last_good([]) is None


def test_a_run_that_ends_dead_exits_non_zero_and_keeps_its_files(tiny_config, tmp_path, capsys):
    # the paper's controller: under the projection the same learning rate overflows instead, and the
    # divergence guard stops the run (tests above); 10 steps, train.dead_steps 20: 20% of 10 = 2 steps
    cfg = tiny_config()
    argv = _argv(cfg, tmp_path / "run", "optim.lr=1e6", "train.steps=10", "pruning.controller=lagrangian")
    assert main([*argv, "data.max_eval_sequences=2", "train.eval_interval=10", "train.save_interval=5"]) == 2
    captured = capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    dead = [
        r["step"] for r in records if abs(r["lm_loss"] - math.log(49152)) < 1e-3 and r["grad_norm"] < 1e-8
    ]
    assert dead == list(range(2, 11))  # the model was destroyed into uniform predictions at step 1 ...
    assert (
        "sheared: warning: step 3: the loss has been 10.8027 = ln(vocabulary) with a zero gradient for 2 steps"
        in captured
    )
    (err,) = [line for line in captured.splitlines() if "sheared: error:" in line]
    assert err.startswith(
        "sheared: error: the run ended dead: from step 2 to its last step 10 the loss was 10.8027"
    )
    assert f"its files stay in {tmp_path / 'run'}" in err
    files = RunDir(tmp_path / "run")  # ... and everything it wrote stays
    assert files.masks.is_file() and [p.name for p in files.list_checkpoints()] == [
        "step_000005",
        "step_000010",
    ]


def test_divergence_after_a_dead_run_names_no_dead_checkpoint_as_good(
    tiny_config, tmp_path, monkeypatch, capsys
):
    from sheared.train import loop

    real_clip, calls = loop._clip, []

    def nan_at_step_4(modules, max_norm):
        calls.append(1)
        return math.nan if len(calls) == 4 else real_clip(modules, max_norm)

    monkeypatch.setattr(loop, "_clip", nan_at_step_4)
    cfg = tiny_config()
    argv = _argv(cfg, tmp_path / "run", "optim.lr=1e6", "train.steps=6", "pruning.controller=lagrangian")
    assert main([*argv, "train.save_interval=1", "train.keep_checkpoints=3", *SMALL]) == 2
    (err,) = _error_lines(capsys)
    assert err == (
        "sheared: error: step 4: the gradient norm is nan; the run stopped and wrote nothing from this step (no "
        "checkpoint is good: the loss after each was non-finite or dead (newest step_000003); start again with a "
        "lower optim.lr (now 1e+06), with --restart or in another --run-dir)"
    )


# --- checkpoints ------------------------------------------------------------------------------------


DAMAGES = [
    "truncate",
    "delete",
    "flip",
    "metadata",
    "trainer_state",
    "manifest",
    "no_manifest",
    "empty_manifest",
]
PROBLEMS = {
    "no_manifest": "its manifest.json is missing or unreadable",
    "empty_manifest": "its manifest.json lists no files",
}


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
    elif how == "no_manifest":  # deleted: the folder looks like a save still being written
        (folder / ckpt.MANIFEST).unlink()
    elif how == "empty_manifest":  # it vouches for nothing, and the weights are cut short
        (folder / ckpt.MANIFEST).write_text('{"files": {}}')
        _damage(folder, "truncate")
    elif how == "unloadable":  # damaged before its manifest was written: the manifest matches
        _damage(folder, "truncate")
        ckpt.write_manifest(folder)
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
    assert "checkpoint step_000004 is damaged (" in err
    assert "moved to step_000004.damaged, resuming from step_000002" in err
    assert how not in PROBLEMS or f"({PROBLEMS[how]})" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_000002"]
    assert (newest.parent / "step_000004.damaged").is_dir()


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


def test_resume_sets_damaged_metrics_lines_aside(four_steps, tmp_path, capsys):
    root, cfg = four_steps
    shutil.copytree(root / "run", tmp_path / "run")
    files = RunDir(tmp_path / "run")
    _damage(ckpt.list_checkpoints(files.path)[-1], "empty_manifest")
    lines = files.metrics.read_text().splitlines(keepends=True)
    cut = lines[0][:25]  # line 1 cut short in the middle, its newline lost
    files.metrics.write_text(cut + "".join(lines[1:]))
    run(cfg("train.steps=6"), files.path, resume=True, progress=False)
    err = capsys.readouterr().err
    assert (
        "checkpoint step_000004 is damaged (its manifest.json lists no files); moved to step_000004.damaged"
        in err
    )
    assert (
        "sheared: metrics.jsonl line 1 was damaged; moved to metrics.damaged.jsonl, the 1 intact records up to "
        "step 2 are kept"
    ) in err
    assert files.metrics_damaged.read_text() == cut + "\n"
    full = read_metrics(root / "full")
    got = read_metrics(files.path)
    assert [r["step"] for r in got] == [2, 3, 4, 5, 6]  # step 2 was on line 1, after the cut
    for a, b in zip(full[1:], got):
        assert {k: v for k, v in a.items() if k != TIMING} == {k: v for k, v in b.items() if k != TIMING}


def test_a_checkpoint_that_matches_its_manifest_but_cannot_load_is_one_line(four_steps, tmp_path, capsys):
    root, cfg = four_steps
    shutil.copytree(root / "run", tmp_path / "run")
    newest = ckpt.list_checkpoints(tmp_path / "run")[-1]
    _damage(newest, "unloadable")
    before = tree_bytes(tmp_path / "run")
    argv = ["prune", "--resume", *_argv(cfg("train.steps=6"), tmp_path / "run", "train.steps=6")[1:]]
    assert main([*argv, "train.save_interval=2", *SMALL]) == 2
    (err,) = _error_lines(capsys)
    assert err.startswith(
        f"sheared: error: checkpoint {newest} matches its manifest.json but cannot be loaded (RuntimeError: "
        "PytorchStreamReader failed reading zip archive"
    )
    assert tree_bytes(tmp_path / "run") == before


def test_a_finished_run_is_left_as_it_is(four_steps, tmp_path, capsys):
    root, cfg = four_steps
    shutil.copytree(root / "full", tmp_path / "run")
    before = tree_bytes(tmp_path / "run")
    argv = ["prune", "--resume", *_argv(cfg("train.steps=6"), tmp_path / "run", "train.steps=6")[1:]]
    argv += ["train.save_interval=2", *SMALL]

    assert main([*argv, "train.keep_checkpoints=1"]) == 0  # a no-op, whatever keep_checkpoints says
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'run'} holds a finished run (step 6 of 6, final masks); nothing to resume\n"
    assert tree_bytes(tmp_path / "run") == before

    assert main([*argv, "pruning.method=activation"]) == 2  # would have replaced it with one-shot masks
    (err,) = _error_lines(capsys)
    assert err == (
        f"sheared: error: --resume cannot change pruning.method: the run in {tmp_path / 'run'} has l0, this "
        "config activation; resume with l0, or start the new run in another --run-dir (or with --restart)"
    )
    assert tree_bytes(tmp_path / "run") == before

    for step in ("step_000004", "step_000006"):  # its checkpoints gone: nothing to resume from
        shutil.rmtree(tmp_path / "run" / "checkpoints" / step)
    before = tree_bytes(tmp_path / "run")
    assert main(argv) == 2
    (err,) = _error_lines(capsys)
    assert err == (
        f"sheared: error: the run in {tmp_path / 'run'} finished (its final masks are there) but holds no intact "
        "checkpoint to resume from (its checkpoints are gone); pass --restart to move its files to "
        "run.replaced-1 and start again from step 0, or choose another --run-dir"
    )
    assert tree_bytes(tmp_path / "run") == before


def test_a_finished_one_shot_run_is_left_as_it_is(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    argv = _argv(cfg, tmp_path / "run", "pruning.method=activation", "data.max_eval_sequences=2")
    assert main(argv) == 0
    before = tree_bytes(tmp_path / "run")
    capsys.readouterr()
    assert main(["prune", "--resume", *argv[1:]]) == 0
    assert capsys.readouterr().out == (
        f"{tmp_path / 'run'} holds a finished run (one-shot pruning: masks and final state); nothing to resume\n"
    )
    assert main(["prune", "--resume", *argv[1:], "pruning.method=l0"]) == 2
    (err,) = _error_lines(capsys)
    assert (
        "--resume cannot change pruning.method: the run in" in err and "has activation, this config l0" in err
    )
    assert tree_bytes(tmp_path / "run") == before


def test_a_run_that_died_before_its_first_checkpoint_starts_again_only_with_restart(
    tiny_config, tmp_path, monkeypatch, capsys
):
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
    before = tree_bytes(tmp_path / "run")
    with pytest.raises(
        UserError, match="stopped before its first checkpoint; pass --restart to move its files"
    ):
        run(tiny_config(*overrides), tmp_path / "run", progress=False)
    with pytest.raises(
        UserError,
        match=r"holds no intact checkpoint to resume from \(it stopped before its first checkpoint\); pass "
        "--restart to move its files to run.replaced-1 and start again from step 0",
    ):
        run(tiny_config(*overrides), tmp_path / "run", resume=True, progress=False)
    assert tree_bytes(tmp_path / "run") == before
    with pytest.raises(UserError, match="pass one"):
        run(tiny_config(*overrides), tmp_path / "run", resume=True, restart=True, progress=False)
    capsys.readouterr()
    run(tiny_config(*overrides), tmp_path / "run", restart=True, progress=False)
    assert (
        f"moved the earlier run in {tmp_path / 'run'} to {tmp_path / 'run.replaced-1'}"
        in capsys.readouterr().out
    )
    assert tree_bytes(tmp_path / "run.replaced-1") == before  # every file kept, byte for byte
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


def test_distillation_settings_are_checked_before_the_run(tiny_config, tmp_path, capsys):
    from sheared.config import load_config
    from sheared.train.config import PruneConfig

    for override, message in {
        "distill.temperature=.nan": "distill.temperature must be a positive number, got nan",
        "distill.temperature=.inf": "distill.temperature must be a positive number, got inf",
        "distill.temperature=0": "distill.temperature must be a positive number, got 0.0",
        "distill.alpha=.nan": "distill.alpha must be in [0, 1], got nan",
        "distill.alpha=1.5": "distill.alpha must be in [0, 1], got 1.5",
        "optim.lr=.nan": "optim.lr must be a positive number, got nan",
    }.items():
        with pytest.raises(UserError) as refused:
            load_config(PruneConfig, "configs/tiny/prune.yaml", [override])
        assert str(refused.value) == f"{override.split('.')[0]}: {message}"
    cfg = tiny_config()
    assert main(_argv(cfg, tmp_path / "run", "distill.teacher=source", "distill.top_k=49153")) == 2
    (err,) = _error_lines(capsys)
    assert err == (
        "sheared: error: distill.top_k is 49153 but the vocabulary has 49152 tokens; choose at most 49152, or "
        "null for the whole vocabulary"
    )
    assert not (tmp_path / "run").exists()


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
