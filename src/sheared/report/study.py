"""Figures of `sheared study` (`sheared.study` writes results.json; this draws it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sheared.files import atomic_write
from sheared.run_dir import DOMAIN_WEIGHT, RunDir

DPI = 110


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), binary=True)


def study_figures(summary: dict[str, Any], out: Path) -> None:
    """The study's figures: mean held-out loss against tokens per arm, the final loss per domain, and
    the domain weights of one arm's continued pretraining (`loss_vs_tokens.png`, `domain_losses.png`,
    `domain_weights.png` in `out`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: the study's figures are skipped (pip install 'sheared[plots]')")
        return
    arms, domains = summary["arms"], list(summary["source_eval_loss"])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, r in arms.items():
        points = [(p["tokens"], sum(p["eval_loss"].values()) / len(p["eval_loss"])) for p in r["curve"]]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(
        sum(summary["source_eval_loss"].values()) / len(domains),
        color="black",
        linestyle="--",
        label="source",
    )
    ax.set(
        title="mean held-out loss against tokens (first seed)",
        xlabel="tokens (calibration + pruning + training)",
        ylabel="loss",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, out / "loss_vs_tokens.png")

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / (len(arms) + 1)
    for i, (name, values) in enumerate(
        [("source", summary["source_eval_loss"])] + [(n, r["eval_loss"]) for n, r in arms.items()]
    ):
        ax.bar([d + i * width for d in range(len(domains))], [values[d] for d in domains], width, label=name)
    ax.set_xticks([d + 0.4 for d in range(len(domains))], domains)
    ax.set(title="final held-out loss per domain (mean over seeds)", ylabel="loss")
    ax.legend(fontsize="small", ncols=3)
    _save(fig, out / "domain_losses.png")

    dbl = next((n for n in ("best+distill", "activation", *arms) if n in arms), None)
    if dbl is not None:
        records = RunDir(arms[dbl].get("train_dir", out / dbl / "train")).read_metrics()
        fig = Figure(figsize=(8, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        steps = [r["step"] for r in records]
        for d in domains:
            ax.plot(steps, [r.get(DOMAIN_WEIGHT + d, math.nan) for r in records], label=d)
        ax.set(
            title=f"domain weights of `{dbl}`'s continued pretraining (dynamic batch loading, first seed)",
            xlabel="step",
        )
        ax.legend(fontsize="small", ncols=2)
        _save(fig, out / "domain_weights.png")
