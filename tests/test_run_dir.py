"""`sheared.run_dir`: what a run directory means, on small hand-made folders (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sheared.errors import UserError
from sheared.run_dir import (
    MANIFEST,
    TRAINER_STATE,
    RunDir,
    checkpoint_name,
    checkpoint_problem,
    checkpoint_run,
    checkpoint_step,
    cut_metrics,
    read_metrics,
    read_run_state,
    write_manifest,
    write_run_state,
)


def _run(path: Path, config: dict | None) -> RunDir:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return RunDir(path)


def _checkpoint(run: RunDir, step: int | str, complete: bool = True) -> Path:
    folder = run.checkpoints / (checkpoint_name(step) if isinstance(step, int) else step)
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
    if complete:
        write_manifest(folder)
    return folder


TRAIN = {"model": "m", "train": {"steps": 4}}
LEARNED = {"source": "s", "pruning": {"method": "l0"}, "train": {"steps": 4}}
ONE_SHOT = {"source": "s", "pruning": {"method": "activation"}, "train": {"steps": 4}}


# --- kind ------------------------------------------------------------------------------------------


def test_kind_of_each_run_and_of_other_folders(tmp_path):
    assert RunDir(tmp_path / "missing").kind() is None
    assert _run(tmp_path / "empty", None).kind() is None
    assert _run(tmp_path / "train", TRAIN).kind() == "train"
    assert _run(tmp_path / "learned", LEARNED).kind() == "prune"
    assert _run(tmp_path / "default", {"source": "s", "pruning": {"target": {}}}).kind() == "prune"
    for method in ("activation", "magnitude", "random"):
        assert _run(tmp_path / method, {"pruning": {"method": method}}).kind() == "oneshot"


def test_a_broken_config_is_one_line(tmp_path):
    run = _run(tmp_path / "run", None)
    run.config.write_text("pruning: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        run.kind()


def test_read_config_and_latest_config(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    assert run.read_config() == TRAIN
    assert run.latest_config() == TRAIN
    for n, steps in ((1, 6), (2, 8)):
        (run.path / f"config.resume-{n}.yaml").write_text(
            yaml.safe_dump({**TRAIN, "train": {"steps": steps}})
        )
    assert run.read_config() == TRAIN  # config.yaml is what the run started with
    assert run.latest_config() == {"model": "m", "train": {"steps": 8}}
    assert run.next_resume_config() == run.path / "config.resume-3.yaml"
    assert RunDir(tmp_path / "none").read_config() is None


# --- checkpoints -----------------------------------------------------------------------------------


def test_newest_checkpoint_is_the_newest_with_a_manifest(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    assert run.newest_checkpoint() is None  # no checkpoints folder
    run.checkpoints.mkdir()
    assert run.newest_checkpoint() is None
    _checkpoint(run, 2)
    _checkpoint(run, 999_999)
    _checkpoint(run, 1_000_000)  # seven digits: ordered by step, not by name
    _checkpoint(run, 1_000_001, complete=False)  # still being written (or killed): no manifest
    _checkpoint(run, "step_2000000.tmp")
    _checkpoint(run, "step_3000000.damaged")
    _checkpoint(run, "other")
    assert [p.name for p in run.list_checkpoints()] == ["step_000002", "step_999999", "step_1000000"]
    assert run.newest_checkpoint() == run.checkpoints / "step_1000000"
    assert checkpoint_step(run.newest_checkpoint()) == 1_000_000
    assert checkpoint_step(run.checkpoints / "step_3000000.damaged") is None


def test_checkpoint_run_finds_the_run_of_a_checkpoint_folder(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    folder = _checkpoint(run, 3)
    assert checkpoint_run(folder) == run
    assert checkpoint_run(run.path) is None
    (folder / TRAINER_STATE).unlink()
    assert checkpoint_run(folder) is None
    assert (folder / MANIFEST).is_file()


# --- finished --------------------------------------------------------------------------------------


def test_a_train_run_is_finished_by_a_complete_checkpoint_of_its_final_step(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    assert run.finished() is False
    _checkpoint(run, 2)
    assert run.finished() is False
    _checkpoint(run, 4, complete=False)
    assert run.finished() is False
    write_manifest(run.checkpoints / "step_000004")
    assert run.finished() is True
    assert run.finished(steps=4) is True
    assert run.finished(steps=6) is False  # a caller that wants more steps
    assert run.finished(steps=2) is False  # the newest checkpoint counts, not any
    (run.path / "config.resume-1.yaml").write_text(yaml.safe_dump({**TRAIN, "train": {"steps": 6}}))
    assert run.finished() is False  # resumed to run longer
    _checkpoint(run, 6)
    assert run.finished() is True


def test_a_learned_pruning_run_needs_its_final_checkpoint_and_masks(tmp_path):
    run = _run(tmp_path / "run", LEARNED)
    _checkpoint(run, 4)
    assert run.finished() is False  # stopped between the last checkpoint and the masks
    run.masks.parent.mkdir()
    run.masks.write_bytes(b"masks")
    assert run.finished() is True
    assert run.finished(steps=8) is False


def test_a_one_shot_run_is_finished_by_its_final_state_and_masks(tmp_path):
    run = _run(tmp_path / "run", ONE_SHOT)
    assert run.finished() is False
    run.masks.parent.mkdir()
    run.masks.write_bytes(b"masks")
    assert run.finished() is False  # killed before final_state.json, which is written last
    run.final_state.write_text(json.dumps({"step": 0}))
    assert run.finished() is True
    assert run.finished(steps=100) is True  # one-shot runs take no steps
    assert run.read_final_state() == {"step": 0}


def test_a_folder_that_is_no_run_is_not_finished(tmp_path):
    assert RunDir(tmp_path / "missing").finished() is False
    run = _run(tmp_path / "run", None)
    run.final_state.write_text("{}")
    run.masks.parent.mkdir()
    run.masks.write_bytes(b"masks")
    assert run.finished() is False
    assert _run(tmp_path / "nosteps", {"model": "m"}).finished() is False


# --- metrics ---------------------------------------------------------------------------------------


def test_metrics_are_read_in_order(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    assert run.read_metrics() == []  # none yet
    run.metrics.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": "nan"}\n')
    notes: list[str] = []
    assert run.read_metrics(notes) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": "nan"}]
    assert notes == []
    assert read_metrics(run.path) == run.read_metrics()


def test_a_half_written_last_line_is_skipped_with_a_note(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    run.metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    notes: list[str] = []
    assert run.read_metrics(notes) == [{"step": 1}, {"step": 2}]
    assert notes == ["the last line of metrics.jsonl is incomplete (the run is writing it); skipped"]
    assert run.read_metrics() == [{"step": 1}, {"step": 2}]  # without a notes list
    run.metrics.write_text('{"step": 1}\n[1, 2]\n\n')  # the last non-blank line, not a record
    assert run.read_metrics() == [{"step": 1}]


@pytest.mark.parametrize("bad", ["not json", '{"loss": 1.0}', "[1, 2]", '{"step": 2'])
def test_a_bad_line_before_the_last_is_refused(tmp_path, bad):
    run = _run(tmp_path / "run", TRAIN)
    run.metrics.write_text(f'{{"step": 1}}\n\n{bad}\n{{"step": 3}}\n')
    with pytest.raises(
        UserError, match=r"metrics.jsonl line 3 is not a metrics record \(a JSON object with 'step'\)"
    ):
        run.read_metrics()


def test_cut_metrics_sets_damaged_lines_aside_and_keeps_the_intact_ones(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    lines = [f'{{"step": {i}, "loss": {i}.5}}' for i in range(1, 7)]
    cut_short = lines[1][:9]  # line 2 lost its end and its newline: line 3 follows on the same line
    text = "\n".join([lines[0], cut_short + lines[2], "\x00\x00garbage", *lines[3:5], lines[5][:7]])
    run.metrics.write_bytes(text.encode())  # the last line half-written, no newline
    records, note = cut_metrics(run.path, 4)
    assert [r["step"] for r in records] == [1, 3, 4]  # step 5 comes again from the resumed run
    assert note == (
        "metrics.jsonl lines 2, 3 were damaged; moved to metrics.damaged.jsonl, "
        "the 3 intact records up to step 4 are kept"
    )
    assert run.metrics.read_text() == "\n".join([lines[0], lines[2], lines[3]]) + "\n"
    assert run.metrics_damaged.read_bytes() == (cut_short + "\n\x00\x00garbage\n").encode()
    records, note = cut_metrics(run.path, 4)  # clean now: nothing more set aside, nothing lost
    assert [r["step"] for r in records] == [1, 3, 4] and note is None
    assert run.metrics_damaged.read_bytes() == (cut_short + "\n\x00\x00garbage\n").encode()


# --- resume: the same run, or another one ------------------------------------------------------------


RESUMED = {
    "source": "s",
    "data": {"path": "d"},
    "pruning": {
        "method": "l0",
        "controller": "projection",
        "target": {"hidden_size": 48, "num_hidden_layers": 3},
    },
    "train": {"steps": 4, "seed": 0},
}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("pruning.method", "activation", "pruning.method: the run in {} has l0, this config activation"),
        (
            "pruning.controller",
            "lagrangian",
            "pruning.controller: the run in {} has projection, this config lagrangian",
        ),
        (
            "pruning.target.hidden_size",
            40,
            "pruning.target.hidden_size: the run in {} has 48, this config 40",
        ),
        (
            "pruning.target",
            {"params_fraction": 0.5},
            "pruning.target: the run in {} has {{'hidden_size': 48, ",
        ),
        ("train.seed", 3, "train.seed: the run in {} has 0, this config 3"),
        ("data.path", "other", "data.path: the run in {} has d, this config other"),
        ("source", "t", "source: the run in {} has s, this config t"),
    ],
)
def test_resume_refuses_another_run_naming_the_key(tmp_path, key, value, expected):
    run = _run(tmp_path / "run", RESUMED)
    new = yaml.safe_load(yaml.safe_dump(RESUMED))
    *parents, last = key.split(".")
    place = new
    for part in parents:
        place = place[part]
    place[last] = value
    before = run.config.read_bytes()
    with pytest.raises(UserError, match=r"^--resume cannot change ") as refused:
        run.check_resume(new)
    assert expected.format(run.path) in str(refused.value) and "\n" not in str(refused.value)
    assert [p.name for p in run.path.iterdir()] == ["config.yaml"] and run.config.read_bytes() == before
    run.check_resume(yaml.safe_load(yaml.safe_dump(RESUMED)))  # the same run: fine
    run.check_resume({**RESUMED, "train": {"steps": 8, "seed": 0}, "optim": {"lr": 1.0}})  # longer, other lr


def test_resume_compares_paths_budgets_and_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run(tmp_path / "run", {**RESUMED, "data": {"path": str(tmp_path / "d")}})
    run.check_resume(RESUMED)  # `d` from here is the same folder
    budget = {**RESUMED, "pruning": {**RESUMED["pruning"], "target": {"params_fraction": 0.5, "dtype": None}}}
    run.target_search.write_text(json.dumps({"budget": {"params_fraction": 0.5, "dtype": None}}))
    run.check_resume(budget)  # the budget its search recorded
    budget["pruning"]["target"]["params_fraction"] = 0.4
    with pytest.raises(
        UserError, match=r"target_search.json was searched for another budget \(\{'params_fraction': 0.5\}\)"
    ):
        run.check_resume(budget)
    with pytest.raises(
        UserError, match="holds a run of `sheared prune`; resume it with `sheared prune --resume`"
    ):
        run.check_resume(TRAIN)
    RunDir(tmp_path / "none").check_resume(TRAIN)  # no run there: nothing to compare


def test_move_aside_moves_the_run_and_only_the_run(tmp_path):
    run = _run(tmp_path / "other", TRAIN)
    _checkpoint(run, 2)
    run.metrics.write_text('{"step": 1}\n')
    (run.path / "config.resume-1.yaml").write_text("a: 1\n")
    (run.path / "notes.txt").write_text("mine")
    before = {p.relative_to(run.path): p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert run.replaced_dir() == tmp_path / "other.replaced-1"
    aside = run.move_aside()
    assert aside == tmp_path / "other.replaced-1"
    moved = {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()}
    assert moved == {k: v for k, v in before.items() if str(k) != "notes.txt"}  # byte for byte
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]
    assert not run.is_run() and not run.holds_run()
    run.config.write_text("model: m\n")
    assert run.move_aside() == tmp_path / "other.replaced-2"  # the first one stays
    assert (aside / "config.yaml").read_text() == yaml.safe_dump(TRAIN)
    assert RunDir(tmp_path / "empty").move_aside() is None


# --- checkpoints: what counts as intact -------------------------------------------------------------


def test_a_manifest_vouches_only_for_the_files_it_lists(tmp_path):
    run = _run(tmp_path / "run", TRAIN)
    folder = _checkpoint(run, 2)
    assert checkpoint_problem(folder) is None
    (folder / "__0_0.distcp").write_bytes(b"weights")
    assert checkpoint_problem(folder) == "__0_0.distcp is not in its manifest.json"
    (folder / MANIFEST).write_text('{"files": {}}')
    assert checkpoint_problem(folder) == "its manifest.json lists no files"
    write_manifest(folder)
    assert checkpoint_problem(folder) is None
    newer = _checkpoint(run, 4, complete=False)  # a finished save always leaves its manifest
    problems: list = []
    assert run.intact_checkpoint(problems) == folder
    assert problems == [(newer, "its manifest.json is missing or unreadable")]
    assert [p.name for p in run.list_checkpoints()] == ["step_000002"]


# --- the run state next to an export ---------------------------------------------------------------


def test_run_state_round_trip(tmp_path):
    state = {"domain_weights": {"a": 0.25, "b": 0.75}, "reference_losses": {"a": 2.0, "b": 3.0}}
    path = write_run_state(tmp_path / "export", state)
    assert path == tmp_path / "export" / "sheared_run_state.json"
    assert path.read_text() == json.dumps(state, indent=2) + "\n"
    assert read_run_state(tmp_path / "export") == state
    assert read_run_state(tmp_path / "other") == {}
    assert read_run_state(tmp_path / "model.gguf") == {}
