"""`sheared report`: figures and summary.md from synthetic run directories (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

from sheared.errors import UserError
from sheared.model.args import ModelArgs
from sheared.report import load_run, write_report
from sheared.report.figures import layer_grid, plan_figures, plot_losses, plot_scores, ranked_scores
from sheared.report.run import series, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("a", "b")
MASK_NAMES = ("layer", "kv_group", "head", "intermediate", "hidden")
# The source (L=4, G=2, r=2, I=16, d=8) and the target (3 layers, 1 KV group of 1 head, I=8, d=6).
SOURCE = ModelArgs(
    family="llama",
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
)
TARGET = dict(
    num_hidden_layers=3, hidden_size=6, num_attention_heads=1, num_key_value_heads=1, intermediate_size=8
)
TARGET_SPARSITY = dict(layer=0.25, kv_group=0.5, head=0.5, intermediate=0.5, hidden=0.25)
# Final eval and reference losses, as the last eval step logs them.
FINAL_EVAL = {"a": 2.3456789, "b": 3.1234567}
REFERENCE = {"a": 2.5, "b": 3.0}


def _records(steps: int, eval_every: int | None, pruning: bool, lagrangian: bool = True) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        lm = 4.0 * math.exp(-step / 15) + 2.5 + 0.05 * math.sin(step)
        lag = 0.3 * math.exp(-step / 10) if pruning and lagrangian else 0.0
        w = 0.5 + 0.2 * step / steps
        record = {
            "step": step,
            "tokens": 512 * step,
            "loss": lm + lag,
            "lm_loss": lm,
            "lag_loss": lag,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 1000.0,
        }
        if pruning:
            warm = min(1.0, step / (steps / 4))
            for name in MASK_NAMES:
                record[f"expected_sparsity/{name}"] = TARGET_SPARSITY[name] * warm + 0.01 * math.exp(
                    -step / 8
                )
                record[f"target_sparsity/{name}"] = TARGET_SPARSITY[name] * warm
                record[f"lambda1/{name}"] = 0.1
                record[f"lambda2/{name}"] = 0.2
                record[f"lag_loss/{name}"] = lag / len(MASK_NAMES)
            record["expected_params"] = 3000.0 - 1000.0 * warm
        record.update({"domain_weight/a": w, "domain_weight/b": 1 - w})
        if eval_every and step % eval_every == 0:
            decay = (steps - step) / steps
            record.update({f"eval_loss/{d}": FINAL_EVAL[d] + decay for d in DOMAINS})
            record.update({f"reference_loss/{d}": REFERENCE[d] for d in DOMAINS})
        records.append(record)
    return records


def _masks() -> dict:
    L, G, r = SOURCE.num_hidden_layers, SOURCE.num_key_value_heads, SOURCE.heads_per_group
    intermediate = torch.zeros(L, SOURCE.intermediate_size)
    intermediate[:, ::2] = 1.0  # 8 of 16
    masks = {
        "layer": torch.tensor([1.0, 0.0, 1.0, 1.0]),  # layer 1 dropped
        "kv_group": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        "head": torch.tensor([0.0, 1.0]).repeat(L, G, 1),  # (L, G, r): head j=1 of each group
        "intermediate": intermediate,
        "hidden": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]),
    }
    assert masks["head"].shape == (L, G, r)
    return {
        "masks": masks,
        "log_alpha": {k: torch.zeros_like(v) for k, v in masks.items()},
        "target": TARGET,
        "source": dataclasses.asdict(SOURCE),
    }


def _scores(masks: dict) -> dict:
    """scores.pt content whose top-k per row are exactly `masks` (kept: 1 + noise, dropped: noise)."""
    g = torch.Generator().manual_seed(0)
    scores = {
        k: m.double() + 0.5 * torch.rand(m.shape, generator=g, dtype=torch.float64) for k, m in masks.items()
    }
    calibration = {"method": "activation", "calibration_tokens": 512, "calibration_sequences": 8}
    return {"scores": scores, "source": dataclasses.asdict(SOURCE), "calibration": calibration}


def make_run(
    root, *, pruning=True, steps=40, eval_every: int | None = 10, finished=True, scores=False, lagrangian=True
):
    """A run directory as `sheared prune` / `sheared train` leave it (config, metrics, masks; scores.pt
    of a scored l0 init with `scores`)."""
    root.mkdir(parents=True)
    if pruning:
        config = {"source": "runs/src", "pruning": {"target": TARGET}, "train": {"steps": steps}}
    else:
        config = {"model": "runs/export", "train": {"steps": steps}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps(r) for r in _records(steps, eval_every, pruning, lagrangian)]
    (root / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if pruning and finished:
        (root / "masks").mkdir()
        torch.save(_masks(), root / "masks" / "masks.pt")
    if scores:
        torch.save(_scores(_masks()["masks"]), root / "scores.pt")
    return root


def make_oneshot_run(root, method="activation"):
    """A run directory as a one-shot `sheared prune` leaves it (`sheared.train.oneshot`): one record of
    step 0, masks.pt, scores.pt and final_state.json, no checkpoint."""
    root.mkdir(parents=True)
    config = {
        "source": "runs/src",
        "pruning": {"target": TARGET, "method": method},
        "train": {"steps": 1, "seed": 0},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    record = {"step": 0, "tokens": 512 if method == "activation" else 0, "calibration_seconds": 0.1}
    record.update({f"expected_sparsity/{n}": t for n, t in TARGET_SPARSITY.items()})
    record.update({f"target_sparsity/{n}": t for n, t in TARGET_SPARSITY.items()})
    record["expected_params"] = 2000.0
    record.update({f"domain_weight/{d}": 0.5 for d in DOMAINS})
    record.update({f"eval_loss/{d}": FINAL_EVAL[d] for d in DOMAINS})
    record.update({f"reference_loss/{d}": REFERENCE[d] for d in DOMAINS})
    (root / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (root / "masks").mkdir()
    torch.save(_masks(), root / "masks" / "masks.pt")
    scores = _scores(_masks()["masks"])
    if method != "activation":
        scores["calibration"] = {"method": method, "calibration_tokens": 0}
    torch.save(scores, root / "scores.pt")
    (root / "final_state.json").write_text(
        json.dumps({"step": 0, "tokens": record["tokens"], "method": method})
    )
    return root


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_pruning_run_report(tmp_path):
    run = make_run(tmp_path / "run")
    summary = write_report(run)
    assert summary == run / "report" / "summary.md"
    for name in ("losses", "domain_losses", "domain_weights", "sparsity", "kept_structures"):
        assert_png(run / "report" / f"{name}.png")
        assert f"![{name}]({name}.png)" in summary.read_text()
    text = summary.read_text()
    assert "pruning with learned masks (`sheared prune`, `pruning.method: l0`)" in text
    assert "- **Steps:** 40 of 40 (20,480 tokens)" in text
    assert "4 layers, hidden 8, 4 query heads in 2 KV groups, intermediate 16" in text  # source
    assert "3 layers, hidden 6, 1 query head in 1 KV group, intermediate 8" in text  # target
    assert "## Evaluation (step 40)" in text
    assert "| a | 2.3457 | 2.5000 | -0.1543 |" in text
    assert "| b | 3.1235 | 3.0000 | +0.1235 |" in text
    assert "| a | 0.7000 |" in text and "| b | 0.3000 |" in text  # final domain weights
    assert "| kv_group | 0.5001 | 0.5000 | +0.0001 |" in text  # 0.5 + 0.01 * exp(-40 / 8)
    assert "Kept layers: 0, 2, 3 (3 of 4); hidden size 6 of 8; " in text
    assert "| 0 | 0 | 1 | 8 / 16 |" in text  # layer, KV group, query head h = g * r + j
    assert "| 3 | 1 | 3 | 8 / 16 |" in text
    assert "Notes" not in text  # nothing was skipped


def test_train_run_has_no_pruning_figures(tmp_path):
    run = make_run(tmp_path / "run", pruning=False)
    out = tmp_path / "elsewhere"
    summary = write_report(run, out)
    assert summary == out / "summary.md"
    for name in ("losses", "domain_losses", "domain_weights"):
        assert_png(out / f"{name}.png")
    assert not (out / "sparsity.png").exists() and not (out / "kept_structures.png").exists()
    text = summary.read_text()
    assert "training (`sheared train`" in text and "`runs/export`" in text
    assert "not a pruning run: no sparsity.png or kept_structures.png" in text
    assert "## Sparsity" not in text and "sparsity.png)" not in text
    assert "| b | 3.1235 | 3.0000 | +0.1235 |" in text


def test_unfinished_run_without_eval_steps(tmp_path):
    run = make_run(tmp_path / "run", steps=12, eval_every=None, finished=False)
    text = write_report(run).read_text()
    for name in ("losses", "domain_weights", "sparsity"):
        assert_png(run / "report" / f"{name}.png")
    assert not (run / "report" / "domain_losses.png").exists()
    assert not (run / "report" / "kept_structures.png").exists()
    assert "No evaluation step yet" in text
    assert "no masks/masks.pt (the run has not finished): kept_structures.png skipped" in text
    assert "3 layers, hidden 6, 1 query head in 1 KV group, intermediate 8" in text  # target from config
    assert "kept_structures.png)" not in text and "domain_losses.png)" not in text


def test_unreadable_masks_are_a_note_not_a_crash(tmp_path):
    run = make_run(tmp_path / "run", steps=5, eval_every=None)
    (run / "masks" / "masks.pt").write_bytes(b"PK\x03\x04 half written")
    text = write_report(run).read_text()
    assert "masks/masks.pt cannot be read" in text and "kept_structures.png skipped" in text


def test_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(UserError, match=r"has no metrics.jsonl; is it a run directory\?"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_half_written_last_line_is_skipped_other_bad_lines_refused(tmp_path):
    run = make_run(tmp_path / "run", steps=5, eval_every=None)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    data = load_run(run)
    assert [r["step"] for r in data.records] == [1, 2, 3, 4, 5]
    assert "incomplete" in data.notes[0]
    (run / "metrics.jsonl").write_text('{"step": 1}\n\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 3 is not a metrics record"):
        load_run(run)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="has no records yet"):
        load_run(run)


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", steps=3, eval_every=None, pruning=False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r"pip install 'sheared\[plots\]'"):
        write_report(run)
    assert not (run / "report").exists()


def test_series_smooth_and_layer_grid():
    steps, values = series([{"step": 1, "x": 1.0}, {"step": 2}, {"step": 3, "x": "nan"}], "x")
    assert steps.tolist() == [1.0, 3.0] and values[0] == 1.0 and math.isnan(values[1])
    # Bias-corrected: a constant stays constant from the first point; NaN is skipped, not spread.
    assert smooth(np.array([2.0, 2.0, np.nan, 2.0]), 10).tolist() == pytest.approx([2.0] * 4)
    assert smooth(np.array([0.0, 1.0]), 1).tolist() == [0.0, 1.0]
    grid = layer_grid(_masks())
    assert grid.layer.tolist() == [1, 0, 1, 1]
    assert grid.query_heads.tolist()[0] == [0, 1, 0, 0] and grid.query_heads.tolist()[3] == [0, 0, 0, 1]
    assert grid.intermediate.tolist() == [8] * 4 and grid.hidden == 6 and grid.target_intermediate == 8
    absent = _masks()
    del absent["masks"]["head"]  # a mask type the target does not shrink keeps everything
    assert layer_grid(absent).query_heads.tolist()[0] == [1, 1, 0, 0]


# --- reports that fit the run: which figures, none empty, legends true ------------------------------

LEARNED_FIGURES = {"losses", "domain_losses", "domain_weights", "sparsity", "kept_structures"}


def _pngs(folder) -> set[str]:
    return {p.stem for p in folder.glob("*.png")}


def _data_points(ax) -> int:
    """Points of data an axes shows: lines in data coordinates (not axhline/axvline), images, bars,
    filled areas."""
    lines = sum(
        int(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).sum())
        for line in ax.get_lines()
        if line.get_transform() == ax.transData
    )
    areas = sum(len(c.get_paths()) for c in ax.collections)
    return lines + len(ax.images) + len(ax.patches) + areas


def _assert_drawn_and_legends_true(fig) -> None:
    for ax in (a for a in fig.axes if a.get_visible()):
        assert _data_points(ax) > 0, f"empty axes: {ax.get_title()!r}"
        legend = ax.get_legend()
        if legend is not None:
            drawn = [a.get_label() for a in [*ax.get_lines(), *ax.collections, *ax.patches]]
            shown = [t.get_text() for t in legend.get_texts()]
            assert sorted(shown) == sorted(x for x in drawn if x and not x.startswith("_")), ax.get_title()


def test_png_files_fit_the_run_kind(tmp_path):
    learned = write_report(make_run(tmp_path / "l0", scores=True)).parent
    assert _pngs(learned) == LEARNED_FIGURES | {"scores"}
    train = write_report(make_run(tmp_path / "train", pruning=False)).parent
    assert _pngs(train) == {"losses", "domain_losses", "domain_weights"}
    oneshot = write_report(make_oneshot_run(tmp_path / "oneshot")).parent
    assert _pngs(oneshot) == {"kept_structures", "scores"}
    # An earlier report's figures that this run has no data for are not left behind.
    (oneshot / "losses.png").write_bytes(PNG_SIGNATURE)
    assert _pngs(write_report(tmp_path / "oneshot").parent) == {"kept_structures", "scores"}


@pytest.mark.parametrize(
    "kind", ["learned", "learned-projection", "learned-long", "unfinished", "train", "one-step", "oneshot"]
)
def test_no_planned_figure_is_empty_and_legends_match_lines(tmp_path, kind):
    root = tmp_path / "run"
    if kind == "oneshot":
        make_oneshot_run(root)
    else:
        options = {
            "learned": dict(scores=True),
            "learned-projection": dict(lagrangian=False),
            "learned-long": dict(steps=120),
            "unfinished": dict(steps=12, eval_every=None, finished=False, scores=True),
            "train": dict(pruning=False),
            "one-step": dict(pruning=False, steps=1, eval_every=1),
        }[kind]
        make_run(root, **options)
    run = load_run(root)
    figures, skipped = plan_figures(run)
    assert figures, "every kind of run has at least one figure"
    for draw in figures.values():
        _assert_drawn_and_legends_true(draw(run))
    if kind == "one-step":
        assert set(figures) == {"domain_losses"}  # eval points are markers; curves need two steps
        assert "fewer than two training steps logged: losses.png skipped" in skipped
    if kind == "unfinished":
        assert "scores" not in figures and any("scores.png" in line for line in skipped)


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_losses_legend_names_each_line_drawn(tmp_path):
    short = load_run(make_run(tmp_path / "short", steps=40))  # smoothing would redraw the same line
    assert _legend(plot_losses(short)) == ["total loss (LM + Lagrangian)", "LM loss"]
    assert len(plot_losses(short).axes[0].get_lines()) == 2
    long = load_run(make_run(tmp_path / "long", steps=120))
    assert _legend(plot_losses(long)) == [
        "total loss (LM + Lagrangian), per step",
        "total loss (LM + Lagrangian), smoothed",
        "LM loss, per step",
        "LM loss, smoothed",
    ]
    projection = load_run(make_run(tmp_path / "projection", lagrangian=False))  # total == LM loss
    assert _legend(plot_losses(projection)) == ["LM loss"]
    text = write_report(tmp_path / "projection").read_text()
    assert "total incl. Lagrangian" not in text and "The total loss differs" not in text
    assert "total incl. Lagrangian" in write_report(tmp_path / "short").read_text()


def test_oneshot_summary_speaks_of_one_shot_pruning(tmp_path):
    text = write_report(make_oneshot_run(tmp_path / "run")).read_text()
    assert (
        "- **Run type:** one-shot pruning by activation importance on 512 calibration tokens (8 sequences); "
        "no training steps (`sheared prune`, `pruning.method: activation`)"
    ) in text
    for absent in ("Steps:", "LM –", "Final training loss", "## Domain weights", "## Sparsity", "losses.png"):
        assert absent not in text, absent
    assert "## Evaluation of the pruned model (no training)" in text
    assert "| a | 2.3457 | 2.5000 | -0.1543 |" in text
    assert "Kept layers: 0, 2, 3 (3 of 4); hidden size 6 of 8; " in text
    assert "one-shot pruning has no training steps" in text
    assert "![kept_structures](kept_structures.png)" in text and "![scores](scores.png)" in text
    magnitude = write_report(make_oneshot_run(tmp_path / "magnitude", "magnitude")).read_text()
    assert "one-shot pruning by weight magnitude (no data); no training steps" in magnitude
    random = write_report(make_oneshot_run(tmp_path / "random", "random")).read_text()
    assert "one-shot pruning by random scores (the sanity floor), seed 0; no training steps" in random


def test_oneshot_kind_without_a_config_is_read_from_the_metrics(tmp_path):
    run = make_oneshot_run(tmp_path / "run")
    (run / "config.yaml").unlink()
    assert load_run(run).kind == "oneshot"
    assert load_run(make_run(tmp_path / "l0")).kind == "prune"


def test_ranked_scores_sorts_every_row():
    scores = np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]])
    kept = np.array([[False, True, True], [True, False, True]])
    rank, value, is_kept = ranked_scores(scores, kept)
    assert rank.tolist() == [0, 1, 2, 0, 1, 2]
    assert value.tolist() == [0.9, 0.5, 0.1, 3.0, 2.0, 1.0]
    assert is_kept.tolist() == [True, True, False, True, True, False]


def test_report_of_a_real_oneshot_run(tiny_config, tmp_path):
    from sheared.train.loop import run

    cfg = tiny_config("pruning.method=activation", "pruning.calibration=4", "data.max_eval_sequences=2")
    run(cfg, tmp_path / "run", progress=False)
    summary = write_report(tmp_path / "run")
    assert _pngs(summary.parent) == {"kept_structures", "scores"}
    text = summary.read_text()
    assert "one-shot pruning by activation importance on 512 calibration tokens (8 sequences)" in text
    assert "Steps:" not in text and "LM –" not in text
    data = load_run(tmp_path / "run")
    assert data.kind == "oneshot" and set(plan_figures(data)[0]) == {"kept_structures", "scores"}
    _assert_drawn_and_legends_true(plot_scores(data))
