"""Every config in configs/ loads, starts with the command that runs it, and dry-runs here."""

from pathlib import Path

import pytest

from sheared.cli import main

STUDY_CONFIGS = sorted(p for p in Path("configs").rglob("study*.yaml"))
RUN_CONFIGS = sorted(
    p
    for p in Path("configs").rglob("*.yaml")
    if p.name != "scaling-law-losses.yaml" and p not in STUDY_CONFIGS
)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=str)
def test_config_starts_with_its_command_and_dry_runs(path, tmp_path, capsys):
    first = path.read_text().splitlines()[0]
    command = "train" if path.name.startswith(("train", "continue")) else "prune"
    assert first.startswith(f"# sheared {command} --config {path} "), first
    assert main([command, "--config", str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert f"{command} plan" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_llama2_7b_recipe_plan_numbers(capsys):
    # --dry-run needs no --run-dir (the recipes' launch commands are often copied without one)
    assert main(["prune", "--config", "configs/llama2-7b/prune-1.3b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6,476,005,376 prunable (attention + MLP)" in out
    assert "target: 24 layers, hidden 2048, 16 query heads in 16 KV groups, intermediate 5504" in out
    assert "parameters: 1,345,423,360 total" in out
    assert "tokens: 131,072 per step (32 sequences × 4096), 419,430,400 in 3,200 steps" in out


def test_bad_target_is_one_line(capsys, tmp_path):
    argv = [
        "prune",
        "--config",
        "configs/llama2-7b/prune-1.3b.yaml",
        "--run-dir",
        str(tmp_path),
        "--dry-run",
        "pruning.target.num_attention_heads=48",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads=48 exceeds the source's 32" in err and err.count("\n") == 1


def test_running_without_run_dir_is_one_line(capsys):
    assert main(["prune", "--config", "configs/tiny/prune.yaml"]) == 2
    err = capsys.readouterr().err
    assert "--run-dir is required" in err and err.count("\n") == 1


def test_precision_values(capsys):
    base = ["prune", "--config", "configs/llama2-7b/prune-1.3b.yaml", "--dry-run"]
    assert main([*base, "train.precision=bf16"]) == 0
    assert "precision: bf16 (as configured)" in capsys.readouterr().out
    # `bf16-autocast` was accepted once and silently trained in fp32; it is refused now
    assert main([*base, "train.precision=bf16-autocast"]) == 2
    err = capsys.readouterr().err
    assert "'bf16-autocast' is not one of" in err and err.count("\n") == 1


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=str)
def test_study_configs_start_with_their_command_and_load(path):
    from sheared.config import load_config
    from sheared.study import StudyConfig

    assert path.read_text().splitlines()[0].startswith(f"# sheared study --config {path} ")
    assert load_config(StudyConfig, path).budget_tokens > 0
