"""Budget targets in runs: the search's choice, its record, the saved config, resume, the plan and
`sheared plan-target`, and one-line refusals of bad budgets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sheared.cli import main
from sheared.config import load_config, read_yaml
from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.export import export_run
from sheared.model import load_source, parameter_counts, read_source_config
from sheared.pruning.importance import select_masks
from sheared.pruning.target import SHAPE_KEYS, TargetBudget, TargetShape, mask_specs
from sheared.run_dir import RunDir, load_masks
from sheared.train.config import PruneConfig
from sheared.train.loop import run

TINY = "configs/tiny/prune.yaml"
# The tiny source: 4 layers, hidden 64, 4 query heads in 2 KV groups, intermediate 128, vocab 49152;
# 148,032 non-embedding parameters, so half of them is 74,016.
SEARCH = ["pruning.width_multiple=16", "pruning.search_candidates=4", "pruning.calibration=4"]
ROW = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([+-][\d.]+)%\s+([\d.]+)(?:\s+([\d.]+|-))?(\s+<- used)?$"
)


def _write_config(path: Path, target: dict, source: Path, data: Path) -> Path:
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["pruning"]["target"] = target
    cfg["source"], cfg["data"]["path"] = str(source), str(data)
    cfg["data"]["auto_prepare"] = None
    cfg.pop("source_init")  # the source exists; never make one
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def budget_config(tiny_assets, tmp_path):
    """(make config file, load PruneConfig) for a budget target on the tiny source and a private data copy."""
    data = tmp_path / "prepared"
    shutil.copytree(tiny_assets / "prepared", data)

    def write(target: dict) -> Path:
        return _write_config(tmp_path / "budget.yaml", target, tiny_assets / "source", data)

    def make(target: dict, *overrides: str) -> PruneConfig:
        return load_config(PruneConfig, write(target), ["data.max_eval_sequences=2", *overrides])

    return write, make


def _rows(text: str) -> list[tuple]:
    """(shape, params, non-embedding, loss or None, used) of every candidate row of a printed table."""
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            shape = TargetShape(*(int(m.group(i)) for i in range(2, 7)))
            loss = None if m.group(11) in (None, "-") else float(m.group(11))
            rows.append(
                (
                    shape,
                    int(m.group(7).replace(",", "")),
                    int(m.group(8).replace(",", "")),
                    loss,
                    bool(m.group(12)),
                )
            )
    return rows


def _calibration_loss(model, data: PreparedData, masks, per_domain: int) -> float:
    """Mean next-token cross-entropy over the first `per_domain` training sequences of every domain,
    from the full logits (independent of the fused loss the run uses)."""
    losses = []
    with torch.no_grad():
        for domain in data.domains:
            ids = data.sequences(domain, "train", list(range(per_domain)))  # (N, T)
            logits = model(ids, masks)  # (N, T, V)
            losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item())
    return sum(losses) / len(losses)


def test_config_accepts_budgets_in_every_form(budget_config):
    _, make = budget_config
    assert make({"params": "3M"}).pruning.target == TargetBudget(params=3_000_000)
    assert make({"params": "1.3B"}).pruning.target.params == 1_300_000_000
    assert make({"params": 60_000_000}).pruning.budget.params == 60_000_000
    assert make({"params_fraction": 0.5}).pruning.budget.params_fraction == 0.5
    assert make({"memory_mb": 6.5, "dtype": "bfloat16"}).pruning.budget == TargetBudget(
        memory_mb=6.5, dtype="bfloat16"
    )
    shape = make(
        {
            "num_hidden_layers": 3,
            "hidden_size": 48,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
        }
    )
    assert shape.pruning.target == TargetShape(3, 48, 2, 1, 64) and shape.pruning.budget is None


def test_oneshot_budget_run_uses_the_lowest_calibration_loss(budget_config, tmp_path, capsys):
    _, make = budget_config
    cfg = make({"params_fraction": 0.5}, "pruning.method=activation", *SEARCH)
    run(cfg, tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    files = RunDir(tmp_path / "run")
    record = json.loads(files.target_search.read_text())
    assert record["budget"] == {"params_fraction": 0.5, "dtype": None} and record["budget_amount"] == 74_016
    assert record["ranking"] == "loss" and record["num_valid_shapes"] == 9 and len(record["candidates"]) == 6
    measured = [c for c in record["candidates"] if c["calibration_loss"] is not None]
    assert measured == record["candidates"][:4]
    best = min(measured, key=lambda c: c["calibration_loss"])
    assert record["chosen"] == {k: best[k] for k in SHAPE_KEYS}
    chosen = TargetShape(**record["chosen"])
    assert (
        f"target: params_fraction 0.5 of the non-embedding parameters -> {chosen.num_hidden_layers} layers, "
        f"hidden {chosen.hidden_size}, {chosen.num_attention_heads} query heads" in out
    )

    # every loss again, from scores.pt and the full logits; all within 1% of the budget
    source = load_source(cfg.source, with_tokenizer=False)
    args, model = source.args, source.model.eval()
    scores = torch.load(files.scores, weights_only=True)["scores"]
    data = PreparedData.open(cfg.data.path)
    for c in measured:
        shape = TargetShape(**{k: c[k] for k in SHAPE_KEYS})
        loss = _calibration_loss(model, data, select_masks(scores, mask_specs(args, shape)), 4)
        assert loss == pytest.approx(c["calibration_loss"], abs=2e-5)
        assert abs(parameter_counts(shape.model_args(args))["num_params_non_embedding"] / 74_016 - 1) <= 0.01
    losses = sorted(c["calibration_loss"] for c in measured)
    assert best["calibration_loss"] == losses[0] and losses[0] < losses[-1]

    # the saved config holds the exact shape (export re-reads it); masks and export at that shape
    assert read_yaml(files.config)["pruning"]["target"] == record["chosen"]
    saved = load_masks(files.path)
    assert saved["target"] == record["chosen"]
    expected = select_masks(scores, mask_specs(args, chosen))
    assert all(torch.equal(getattr(expected, k), saved["masks"][k]) for k in saved["masks"])
    report = export_run(files.path, tmp_path / "export")
    counted = parameter_counts(chosen.model_args(args))["num_params"]
    assert report["verified"] and report["exported_num_params"] == best["num_params"] == counted

    # `plan-target --data` measures the same losses as the run
    argv = [
        "plan-target",
        cfg.source,
        "--params-fraction",
        "0.5",
        "--width-multiple",
        "16",
        "--data",
        cfg.data.path,
    ]
    assert main([*argv, "--calibration", "4", "--candidates", "4", "--precision", "fp32"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[3] for r in rows[:4]] == pytest.approx([c["calibration_loss"] for c in measured], abs=1e-4)
    assert [r[0] for r in rows if r[4]] == [chosen]


def test_l0_budget_run_reuses_its_choice_on_resume(budget_config, tmp_path, capsys):
    write, make = budget_config
    steps = ["train.save_interval=2", "train.eval_interval=2", "pruning.init=activation", *SEARCH]
    run(make({"params_fraction": 0.5}, "train.steps=2", *steps), tmp_path / "run", progress=False)
    files = RunDir(tmp_path / "run")
    first = files.target_search.read_text()
    chosen = json.loads(first)["chosen"]
    assert read_yaml(files.config)["pruning"]["target"] == chosen
    assert files.scores.is_file()  # the search's activation scores, reused for the init
    capsys.readouterr()
    run(
        make({"params_fraction": 0.5}, "train.steps=4", *steps), tmp_path / "run", resume=True, progress=False
    )
    assert "target:" not in capsys.readouterr().out  # no second search
    assert files.target_search.read_text() == first
    assert read_yaml(files.path / "config.resume-1.yaml")["pruning"]["target"] == chosen
    assert load_masks(files.path)["target"] == chosen
    export_run(files.path, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert {k: config[k] for k in SHAPE_KEYS} == chosen

    other = write({"params_fraction": 0.4})
    argv = ["prune", "--config", str(other), "--run-dir", str(files.path), "--resume", *SEARCH]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "target_search.json was searched for another budget" in err and err.count("\n") == 1


def test_dry_run_prints_the_rule_ranked_candidates(budget_config, capsys):
    write, _ = budget_config
    path = str(write({"params_fraction": 0.5}))
    assert main(["prune", "--config", path, "--dry-run", "pruning.method=activation", *SEARCH]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 5 and not any(r[4] for r in rows)  # at least 5 shown; loss search: the run decides
    assert [r[0] for r in rows[:2]] == [TargetShape(4, 32, 4, 2, 128), TargetShape(2, 64, 4, 2, 128)]
    assert all(abs(r[2] / 74_016 - 1) <= 0.01 for r in rows)
    assert (
        "search: the run measures the calibration loss of the first 4 under their one-shot activation" in out
    )
    assert "target (#1, standing in for the measured choice): 4 layers, hidden 32" in out
    assert "target_search.json" in out

    assert (
        main(["prune", "--config", path, "--dry-run", "pruning.search=rule", "pruning.width_multiple=16"])
        == 0
    )
    out = capsys.readouterr().out
    assert [r[0] for r in _rows(out) if r[4]] == [TargetShape(4, 32, 4, 2, 128)]
    assert "search: rule; the run uses #1" in out


def test_plan_target_prints_candidates_within_one_percent(capsys):
    try:
        read_source_config("smollm2-135m")
    except UserError as e:
        pytest.skip(str(e))
    for flags, goal, column in (
        (["--params", "60M"], 60_000_000, 1),
        (["--params-fraction", "0.5"], 53_101_728, 2),
    ):
        assert main(["plan-target", "smollm2-135m", *flags, "--top", "8"]) == 0
        rows = _rows(capsys.readouterr().out)
        assert len(rows) == 8 and all(abs(r[column] / goal - 1) <= 0.01 for r in rows)
    assert main(["plan-target", "smollm2-135m", "--memory-mb", "100", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 10 and all(abs(r[1] * 2 / 1e6 / 100 - 1) <= 0.01 for r in rows)
    assert rows[0][0] == TargetShape(20, 384, 6, 2, 1024) and rows[0][4]
    assert "used: 20 layers, hidden 384, 6 query heads in 2 KV groups, intermediate 1024" in out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"params": "10B"}, "is not below the source's 3,293,760 parameters"),
        ({"params": 100}, "is below the smallest valid shape"),
        ({"params_fraction": 0.999}, "no valid shape lies within 1% of the budget"),
        ({"params": "2M", "params_fraction": 0.5}, "exactly one of params, params_fraction or memory_mb"),
        ({"parms": "2M"}, "unknown key pruning.target.parms; did you mean 'params'?"),
        ({"params": "2M", "hidden_size": 32}, "mixes shape numbers (hidden_size) with a budget (params)"),
        ({"memory_mb": 5}, "memory_mb needs a dtype"),
        ({"params": "2 apples"}, "params must be a parameter count such as 60M"),
    ],
)
def test_bad_budgets_are_one_line(budget_config, tmp_path, capsys, target, message):
    write, _ = budget_config
    path = str(write(target))
    for extra in (["--dry-run"], ["--run-dir", str(tmp_path / "run")]):
        assert main(["prune", "--config", path, "pruning.width_multiple=16", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_plan_target_bad_budgets_are_one_line(tiny_assets, capsys):
    source = str(tiny_assets / "source")
    for flags, message in (
        (["--params", "60M", "--params-fraction", "0.5"], "got params and params_fraction"),
        (["--memory-mb", "5"], "memory_mb needs a dtype"),
        (["--memory-mb", "5", "--dtype", "q8"], "dtype must be one of float32, bfloat16, float16, int8"),
        (["--params", "60M"], "is not below the source's"),
        (["--params-fraction", "0.5", "--width-multiple", "0"], "width_multiple must be at least 1"),
    ):
        assert main(["plan-target", source, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


SMOLLM2_DATA = Path("data/prepared/smollm2-135m")


@pytest.mark.slow
@pytest.mark.skipif(
    not (SMOLLM2_DATA / "metadata.json").is_file(), reason="prepared SmolLM2 sample data absent"
)
def test_smollm2_half_budget_picks_the_lowest_calibration_loss(tmp_path, capsys):
    """SmolLM2-135M at half its non-embedding parameters: the run's shape has the lowest one-shot
    calibration loss of the candidates it measured (each loss checked again from the full logits),
    and its activation masks beat random masks of the same shape."""
    try:
        read_source_config("smollm2-135m")
    except UserError as e:
        pytest.skip(str(e))
    path = _write_config(tmp_path / "smol.yaml", {"params_fraction": 0.5}, Path("smollm2-135m"), SMOLLM2_DATA)
    cfg = load_config(
        PruneConfig,
        path,
        [
            "source=smollm2-135m",
            "pruning.method=activation",
            "pruning.calibration=2",
            "pruning.search_candidates=3",
            "data.max_eval_sequences=1",
            "data.verify=size",
            "train.precision=fp32",
        ],
    )
    run(cfg, tmp_path / "run", progress=False)
    files = RunDir(tmp_path / "run")
    record = json.loads(files.target_search.read_text())
    measured = [c for c in record["candidates"] if c["calibration_loss"] is not None]
    assert len(measured) == 3 and record["budget_amount"] == 53_101_728
    best = min(measured, key=lambda c: c["calibration_loss"])
    assert record["chosen"] == {k: best[k] for k in SHAPE_KEYS}
    source = load_source("smollm2-135m", with_tokenizer=False)
    args, model = source.args, source.model.eval()
    scores = torch.load(files.scores, weights_only=True)["scores"]
    data = PreparedData.open(SMOLLM2_DATA, verify="size")
    for c in measured:
        assert abs(c["num_params_non_embedding"] / 53_101_728 - 1) <= 0.01
    worst = max(measured, key=lambda c: c["calibration_loss"])
    for c in (best, worst):  # the lowest and the highest measured loss, checked from the full logits
        shape = TargetShape(**{k: c[k] for k in SHAPE_KEYS})
        assert _calibration_loss(
            model, data, select_masks(scores, mask_specs(args, shape)), 2
        ) == pytest.approx(c["calibration_loss"], abs=1e-4)
    chosen = TargetShape(**record["chosen"])
    from sheared.pruning.importance import random_scores

    random = select_masks(random_scores(args, 0), mask_specs(args, chosen))
    assert _calibration_loss(model, data, random, 2) > best["calibration_loss"] + 0.5
    print(json.dumps(record["candidates"][:3], indent=1))
