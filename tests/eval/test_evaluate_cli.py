"""`sheared eval` and `sheared report` on the command line, on the tiny source and its export."""

import json
import math
from pathlib import Path

import pytest
import yaml

from sheared.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval_tasks"


def test_per_domain_and_throughput(tiny_assets, tiny_export, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [
        "eval",
        str(tiny_assets / "source"),
        str(tiny_export),
        "--data",
        str(tiny_assets / "prepared"),
        "--throughput",
        "--tp-batch-size",
        "2",
        "--tp-seq-len",
        "16",
        "--tp-new-tokens",
        "4",
        "--tp-rounds",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "per-domain perplexity" in table and "throughput (float32, 1 torch thread(s)" in table
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["source", "export"]
    for name in ("source", "export"):
        for entry in results["domains"][name].values():
            assert entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
        speed = results["throughput"]["results"][name]
        assert speed["forward_tokens_per_s"] > 0 and speed["generate_tokens_per_s"] > 0
        assert speed["forward_tokens_per_s_min"] <= speed["forward_tokens_per_s_max"]
    assert results["throughput"]["settings"]["threads"] == 1
    assert main(argv) == 2  # the results file is not replaced without --force
    assert "already exists" in capsys.readouterr().err


def test_lm_eval_task_through_the_cli(tiny_export, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    spec = yaml.safe_load((FIXTURES / "sheared_tiny_mc.yaml").read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(FIXTURES / "sheared_tiny_mc.jsonl")
    spec["dataset_kwargs"]["cache_dir"] = str(tmp_path / "cache")
    (tasks / "sheared_tiny_mc.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "lm_eval.json"
    argv = [
        "eval",
        str(tiny_export),
        "--tasks",
        "sheared_tiny_mc",
        "--include-path",
        str(tasks),
        "--limit",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "sheared_tiny_mc" in capsys.readouterr().out
    metrics = json.loads(out.read_text())["tasks"]["export"]["tasks"]["sheared_tiny_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0


def test_eval_needs_something_to_do(tiny_export, capsys):
    assert main(["eval", str(tiny_export)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_report_of_a_pruning_run(tiny_config, tmp_path, capsys):
    from sheared.train.loop import run

    run(
        tiny_config("train.steps=4", "train.eval_interval=2", "data.max_eval_sequences=2"),
        tmp_path / "run",
        progress=False,
    )
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "summary.md" in capsys.readouterr().out
    report = tmp_path / "run" / "report"
    for name in ("losses", "domain_losses", "domain_weights", "sparsity", "kept_structures"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![sparsity](sparsity.png)" in (report / "summary.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
