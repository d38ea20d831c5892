"""The figures of a run report, drawn on `matplotlib.figure.Figure` objects with the Agg canvas
(no pyplot, no display, no global backend switch), and which of them a run has data for.

| file                  | drawn for                        | shows                                                    |
|-----------------------|----------------------------------|----------------------------------------------------------|
| `losses.png`          | training steps (learned, train)  | training loss per step (smoothed too on long runs); eval |
| `domain_losses.png`   | eval steps (learned, train)      | per-domain eval loss against its reference loss          |
| `distillation.png`    | distilling runs                  | CE and KD per step; per-domain eval KL to the teacher    |
| `domain_weights.png`  | training steps (learned, train)  | the domain mixture over steps (stacked)                  |
| `sparsity.png`        | learned pruning steps            | expected vs target sparsity per mask type; parameters    |
| `kept_structures.png` | finished pruning (both kinds)    | per layer: kept query heads, KV groups, MLP channels     |
| `scores.png`          | finished pruning with scores.pt  | every structure's score by rank in its row, kept or not  |

A one-shot run has no training steps (one metrics record, of step 0): it gets only the last two.
`plan_figures` decides; a figure without data is never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sheared.errors import UserError
from sheared.files import atomic_write
from sheared.pruning.target import MASK_TYPES
from sheared.report.run import (
    RunData,
    count,
    num_points,
    series,
    smooth,
    smoothing_window,
    target_num_params,
    unit,
)
from sheared.run_dir import (
    DOMAIN_WEIGHT,
    EVAL_KL,
    EVAL_LOSS,
    EXPECTED_SPARSITY,
    MASKS_DIR,
    MASKS_FILE,
    REFERENCE_LOSS,
    SCORES_FILE,
    TARGET_SPARSITY,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
RAW_ALPHA = 0.25  # the raw per-step line is drawn light, under its smoothed line
KEPT_COLOR, PRUNED_COLOR, DROPPED_COLOR = "#1f77b4", "#eeeeee", "#bdbdbd"
MIN_CURVE_POINTS = 2  # a curve over steps needs two logged steps (one value is a table entry)
# An EMA over fewer than 2 points barely differs from the per-step line: that line is drawn alone.
MIN_SMOOTHING_WINDOW = 2.0
# Positive scores whose 95th percentile is more than two decades above their 5th are drawn on a
# log axis, so that the low ones are not flattened onto zero.
LOG_SCALE_SPREAD = 100.0
# What one row of scores is (the structures competing for the same kept places), per mask type.
ROW_OF = {
    "layer": "model",
    "kv_group": "layer",
    "head": "KV group",
    "intermediate": "layer",
    "hidden": "model",
}
SMALL_MARKER, TINY_MARKER, MANY_POINTS = 4.0, 1.5, 400


# --- figures -------------------------------------------------------------------------------------


def matplotlib_classes():
    """(Figure, FigureCanvasAgg), or a UserError saying how to install the optional extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "sheared report needs matplotlib; install it with: pip install 'sheared[plots]'"
        ) from None
    return Figure, FigureCanvasAgg


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas (no pyplot: nothing global, nothing to close)."""
    Figure, FigureCanvasAgg = matplotlib_classes()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG, atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), binary=True)


def _raw_and_smoothed(ax, steps: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    """The per-step line, light, under its smoothed line (labelled each); a short run's per-step line
    alone, where smoothing would draw the same line again."""
    window = smoothing_window(len(values))
    if window < MIN_SMOOTHING_WINDOW:
        ax.plot(steps, values, color=color, linewidth=1.5, label=label)
        return
    ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.8, label=f"{label}, per step")
    ax.plot(steps, smooth(values, window), color=color, linewidth=1.8, label=f"{label}, smoothed")


def _logged_domains(run: RunData, records: list[dict[str, Any]], prefix: str) -> list[str]:
    """The run's domains that have at least one `prefix + domain` value in `records`."""
    return [d for d in run.domains if num_points(records, prefix + d)]


def _per_domain_panel(ax, run: RunData, records: list[dict[str, Any]], prefix: str, title: str, ylabel: str):
    for domain in _logged_domains(run, records, prefix):
        steps, values = series(records, prefix + domain)
        ax.plot(steps, values, marker="o", markersize=3, label=domain)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=1 + len(run.domains) // 8)


def plot_losses(run: RunData) -> Figure:
    """Training loss per step (and smoothed), and per-domain eval loss at eval steps if any."""
    evals = bool(_logged_domains(run, run.eval_records, EVAL_LOSS))
    fig = _new_figure(11 if evals else 6.5, 4)
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    ax = axes[0]
    if run.has_lagrangian:  # else the total is the LM loss: one line, drawn once
        steps, total = series(run.records, "loss")
        _raw_and_smoothed(ax, steps, total, "tab:orange", "total loss (LM + Lagrangian)")
    steps, lm = series(run.records, "lm_loss")
    _raw_and_smoothed(ax, steps, lm, "tab:blue", "LM loss")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        _per_domain_panel(axes[1], run, run.eval_records, EVAL_LOSS, "eval loss per domain", "loss")
    return fig


def plot_distillation(run: RunData) -> Figure:
    """Distillation runs: CE and KD per step (and smoothed), per-domain eval KL to the teacher."""
    evals = [r for r in run.eval_records if any(k.startswith(EVAL_KL) for k in r)]
    fig = _new_figure(11 if evals else 6.5, 4)
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    for key, color, label in (
        ("ce_loss", "tab:blue", "CE (next token)"),
        ("kd_loss", "tab:red", "KD (KL to teacher)"),
    ):
        if num_points(run.records, key):
            steps, values = series(run.records, key)
            _raw_and_smoothed(axes[0], steps, values, color, label)
    axes[0].set(title="distillation: the two terms of the loss", xlabel="step", ylabel="nats per token")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    if evals:
        title = "eval KL(teacher ‖ model) per domain"
        _per_domain_panel(axes[1], run, evals, EVAL_KL, title, "nats per token")
    return fig


def plot_domain_losses(run: RunData) -> Figure:
    """One panel per domain: eval loss over eval steps, its reference loss dashed."""
    evals = run.eval_records
    domains = _logged_domains(run, evals, EVAL_LOSS)
    rows, cols = _grid(len(domains))
    fig = _new_figure(3.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, domain in zip(axes, domains):
        steps, loss = series(evals, EVAL_LOSS + domain)
        ref_steps, ref = series(evals, REFERENCE_LOSS + domain)
        ax.plot(steps, loss, marker="o", markersize=3, color="tab:blue", label="eval")
        if len(ref):
            ax.plot(ref_steps, ref, linestyle="--", color="tab:gray", label="reference")
        title = domain
        if len(ref):
            title += f"\nfinal {loss[-1]:.3f} vs ref {ref[-1]:.3f} ({loss[-1] - ref[-1]:+.3f})"
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(domains) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize="small")
    return fig


def _weight_records(run: RunData) -> tuple[list[str], list[dict[str, Any]]]:
    """The domains with logged weights, and the records that log every one of them (so that the
    stacked curves line up)."""
    domains = _logged_domains(run, run.records, DOMAIN_WEIGHT)
    records = [r for r in run.records if domains and all(DOMAIN_WEIGHT + d in r for d in domains)]
    return domains, records


def plot_domain_weights(run: RunData) -> Figure:
    """The domain mixture over steps, stacked so every column sums to 1."""
    fig = _new_figure(7.5, 3.8)
    ax = fig.subplots()
    domains, records = _weight_records(run)
    curves = [series(records, DOMAIN_WEIGHT + d) for d in domains]
    steps = curves[0][0]
    labels = [f"{d} ({values[-1]:.2f})" for d, (_, values) in zip(domains, curves)]
    ax.stackplot(steps, [values for _, values in curves], labels=labels, alpha=0.85)
    ax.set(
        title="domain weights (stacked; legend: final weight)", xlabel="step", ylabel="weight", ylim=(0, 1)
    )
    ax.margins(x=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", reverse=True)
    return fig


def _params_panel(ax, run: RunData) -> None:
    """Expected parameter count over steps, the target's dashed (when masks.pt tells it)."""
    steps, params = series(run.records, "expected_params")
    target = target_num_params(run.masks)
    scale, suffix, _ = unit(params.max())
    ax.plot(steps, params / scale, color="tab:green", label="expected")
    title = f"parameters ({suffix or 'count'})\nfinal {count(params[-1])}"
    if target is not None:
        ax.axhline(target / scale, color="black", linestyle="--", label="target")
        title += f", target {count(target)}"
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_sparsity(run: RunData) -> Figure:
    """One panel per mask type: expected sparsity vs the (warmed-up) target; expected parameters."""
    names = run.mask_names
    has_params = num_points(run.records, "expected_params") > 0
    rows, cols = _grid(len(names) + has_params)
    fig = _new_figure(3.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        steps, expected = series(run.records, EXPECTED_SPARSITY + name)
        t_steps, target = series(run.records, TARGET_SPARSITY + name)
        ax.plot(steps, expected, color="tab:blue", label="expected")
        title = f"{name}\nfinal {expected[-1]:.3f}"
        if len(target):
            ax.plot(t_steps, target, color="black", linestyle="--", label="target")
            title += f", target {target[-1]:.3f}"
        ax.set_title(title, fontsize="medium")
        ax.set(xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    if names:
        axes[0].set_ylabel("sparsity")
        axes[0].legend(fontsize="small")
    if has_params:
        _params_panel(axes[len(names)], run)
    for ax in axes[len(names) + has_params :]:
        ax.set_visible(False)
    return fig


@dataclass(frozen=True)
class LayerGrid:
    """The final binary masks as per-layer arrays, every structure present (absent masks = kept)."""

    layer: np.ndarray
    """(L,) 1 where the layer is kept."""
    query_heads: np.ndarray
    """(L, H) 1 where the query head is kept (its KV group and the head itself), before the layer mask."""
    kv_groups: np.ndarray
    """(L, G) 1 where the KV group is kept."""
    intermediate: np.ndarray
    """(L,) kept MLP channels."""
    intermediate_size: int
    """I of the source."""
    hidden: int
    """Kept residual dimensions."""
    hidden_size: int
    """d of the source."""
    target_intermediate: int | None = None
    """I_T of the target, when known."""


def layer_grid(masks: dict[str, Any]) -> LayerGrid:
    """masks.pt's content as a LayerGrid (pure; shapes from its `source` args)."""
    source, tensors = masks["source"], masks["masks"]
    L, G = source["num_hidden_layers"], source["num_key_value_heads"]
    r, num_i, d = source["num_attention_heads"] // G, source["intermediate_size"], source["hidden_size"]

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        value = tensors.get(name)
        array = np.ones(shape) if value is None else value.float().numpy()
        assert array.shape == shape, f"mask {name} has shape {array.shape}, expected {shape}"
        return array

    kv = get("kv_group", (L, G))
    heads = get("head", (L, G, r)) * kv[:, :, None]  # (L, G, r): a head needs its group
    return LayerGrid(
        layer=get("layer", (L,)),
        query_heads=heads.reshape(L, G * r),  # query head h = g * r + j
        kv_groups=kv,
        intermediate=get("intermediate", (L, num_i)).sum(axis=1),
        intermediate_size=num_i,
        hidden=int(get("hidden", (d,)).sum()),
        hidden_size=d,
        target_intermediate=masks.get("target", {}).get("intermediate_size"),
    )


def _heatmap(ax, values: np.ndarray, layer: np.ndarray, title: str, xlabel: str, group: int = 0) -> None:
    """Kept/pruned cells of an (L, N) array; rows of dropped layers grey."""
    from matplotlib.colors import ListedColormap

    shown = np.where(layer[:, None] > 0, values, np.nan)
    cmap = ListedColormap([PRUNED_COLOR, KEPT_COLOR]).with_extremes(bad=DROPPED_COLOR)
    L, N = values.shape
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(N) if N <= 32 else np.linspace(0, N - 1, 9).round())
    ax.set_xticks(np.arange(-0.5, N), minor=True)
    ax.set_yticks(np.arange(-0.5, L), minor=True)
    ax.grid(which="minor", color="white", linewidth=1 if max(L, N) <= 48 else 0)
    ax.tick_params(which="minor", length=0)
    if group > 1:  # separate the query heads of different KV groups
        for boundary in np.arange(group, N, group) - 0.5:
            ax.axvline(boundary, color="black", linewidth=1.2)
    ax.set(title=title, xlabel=xlabel)


def plot_kept_structures(run: RunData) -> Figure:
    """Per layer (rows): kept query heads, kept KV groups, kept MLP fraction, layer kept."""
    assert run.masks is not None, "plot_kept_structures needs masks.pt"
    grid = layer_grid(run.masks)
    L, H = grid.query_heads.shape
    G = grid.kv_groups.shape[1]
    head_width, group_width = min(max(2.5, 0.28 * H), 9), min(max(1.4, 0.28 * G), 4)
    fig = _new_figure(head_width + group_width + 4.5, max(2.8, 0.32 * L + 1.6))
    axes = fig.subplots(1, 4, sharey=True, width_ratios=[head_width, group_width, 2.6, 1.0])
    kept_layers = grid.layer > 0
    _heatmap(axes[0], grid.query_heads, grid.layer, "query heads", "head (lines: KV groups)", group=H // G)
    _heatmap(axes[1], grid.kv_groups, grid.layer, "KV groups", "group")
    fraction = np.where(kept_layers, grid.intermediate / grid.intermediate_size, 0)
    ax = axes[2]
    ax.set_axisbelow(True)
    ax.barh(np.arange(L), fraction, color=KEPT_COLOR, height=0.7)
    for i in np.flatnonzero(~kept_layers):
        ax.axhspan(i - 0.5, i + 0.5, color=DROPPED_COLOR)
    for i in range(L):
        text = f"{int(grid.intermediate[i])}/{grid.intermediate_size}" if kept_layers[i] else "dropped"
        ax.text(0.02, i, text, va="center", fontsize="small", color="white" if fraction[i] > 0.3 else "black")
    if grid.target_intermediate is not None:
        ax.axvline(
            grid.target_intermediate / grid.intermediate_size, color="black", linestyle="--", label="target"
        )
        ax.legend(fontsize="x-small", loc="lower right")
    ax.set(title="MLP channels kept", xlabel="fraction of the source's", xlim=(0, 1))
    ax.grid(axis="x", alpha=0.3)
    ax = axes[3]
    _heatmap(ax, grid.layer[:, None], grid.layer, "layer", "")
    ax.set_xticks([])
    for i, kept in enumerate(kept_layers):
        label, color = ("kept", "white") if kept else ("dropped", "black")
        ax.text(0, i, label, ha="center", va="center", fontsize="small", color=color)
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(np.arange(L) if L <= 40 else np.arange(0, L, 4))
    kept_heads = int(grid.query_heads[kept_layers].sum(axis=1).max()) if kept_layers.any() else 0
    fig.suptitle(
        f"kept: {int(kept_layers.sum())}/{L} layers, ≤{kept_heads}/{H} query heads per layer, "
        f"hidden {grid.hidden}/{grid.hidden_size}  (blue: kept, light: pruned, grey: layer dropped)",
        fontsize="medium",
    )
    return fig


def ranked_scores(scores: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every structure's rank within its row (0: the highest score; ties by index, as `select_masks`
    breaks them), its score and whether it is kept.

    Args:
        scores: (..., n) float, one row per group of structures competing for the same kept places.
        kept: (..., n) bool, the final masks.

    Returns:
        (rank, score, kept), each flat (N,), rows one after the other, each sorted by falling score.
    """
    order = np.argsort(-scores, axis=-1, kind="stable")
    rank = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    by_score = np.take_along_axis(scores, order, axis=-1)
    return rank.ravel(), by_score.ravel(), np.take_along_axis(kept, order, axis=-1).ravel()


def _wide_spread(values: np.ndarray) -> bool:
    low, high = np.percentile(values, [5, 95])
    return bool(values.min() > 0 and high > LOG_SCALE_SPREAD * low)


def plot_scores(run: RunData) -> Figure:
    """One panel per pruned structure type: every structure's score against its rank in its row (a
    layer's MLP channels, a KV group's heads, the model's layers), kept ones blue, dropped ones grey,
    and the cut after the number per row the target keeps. One-shot masks keep exactly the top of
    every row; learned masks (a scored l0 init) show where learning departed from the ranking."""
    assert run.scores is not None and run.masks is not None, "plot_scores needs scores.pt and masks.pt"
    from matplotlib.ticker import MaxNLocator

    scores, masks = run.scores["scores"], run.masks["masks"]
    names = [name for name in MASK_TYPES if name in masks and name in scores]
    rows, cols = _grid(len(names))
    fig = _new_figure(3.8 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        values, kept = scores[name].double().numpy(), masks[name].numpy() > 0
        assert values.shape == kept.shape, f"{name}: scores {values.shape}, masks {kept.shape}"
        n = values.shape[-1]
        per_row = int(kept.reshape(-1, n).sum(-1).max())
        rank, value, is_kept = ranked_scores(values, kept)
        size = SMALL_MARKER if len(value) <= MANY_POINTS else TINY_MARKER
        for chosen, color, label in ((is_kept, KEPT_COLOR, "kept"), (~is_kept, DROPPED_COLOR, "dropped")):
            ax.plot(
                rank[chosen],
                value[chosen],
                linestyle="none",
                marker="o",
                markersize=size,
                color=color,
                label=label,
            )
        ax.axvline(per_row - 0.5, color="black", linestyle="--", linewidth=1, label=f"cut: top {per_row}")
        if _wide_spread(value):
            ax.set_yscale("log")
        ax.set_title(f"{name}: keep {per_row} of {n} per {ROW_OF.get(name, 'row')}", fontsize="medium")
        ax.set_xlabel("rank in its row (0: highest score)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize="small")
    method = run.scores.get("calibration", {}).get("method", "one-shot")
    fig.suptitle(
        f"{method} scores, sorted within each row (blue: kept by the final masks, grey: dropped)",
        fontsize="medium",
    )
    return fig


# --- which figures a run gets ------------------------------------------------------------------------

FigureFunction = Callable[[RunData], "Figure"]
# Every figure a report can have (`NAME.png`), in the order summary.md shows them.
FIGURE_NAMES = (
    "losses",
    "domain_losses",
    "distillation",
    "domain_weights",
    "sparsity",
    "kept_structures",
    "scores",
)


def plan_figures(run: RunData) -> tuple[dict[str, FigureFunction], list[str]]:
    """The figures this run has data for (name -> the function drawing it), and one line for each
    figure of its kind that is left out, saying why. A curve over steps needs MIN_CURVE_POINTS
    logged steps; a one-shot run has none, and gets only its kept structures and scores."""
    figures: dict[str, FigureFunction] = {}
    skipped: list[str] = []

    def add(name: str, function: FigureFunction, enough: bool, why: str) -> None:
        if enough:
            figures[name] = function
        else:
            skipped.append(f"{why}: {name}.png skipped")

    if run.kind == "oneshot":
        skipped.append(
            "one-shot pruning has no training steps: no loss, domain-weight or sparsity curves "
            "(its numbers are in the tables below)"
        )
    else:
        few = "fewer than two training steps logged"
        add("losses", plot_losses, num_points(run.records, "lm_loss") >= MIN_CURVE_POINTS, few)
        add("domain_losses", plot_domain_losses, bool(run.eval_records), "no evaluation step yet")
        if num_points(run.records, "kd_loss"):
            add(
                "distillation", plot_distillation, num_points(run.records, "kd_loss") >= MIN_CURVE_POINTS, few
            )
        domains, weighted = _weight_records(run)
        why = "no domain weights logged" if not domains else few
        add("domain_weights", plot_domain_weights, len(weighted) >= MIN_CURVE_POINTS, why)
    if not run.pruning:
        skipped.append("not a pruning run: no sparsity.png or kept_structures.png")
        return figures, skipped
    if run.kind == "prune":
        logged = max(
            [num_points(run.records, EXPECTED_SPARSITY + name) for name in run.mask_names]
            + [num_points(run.records, "expected_params")]
        )
        add("sparsity", plot_sparsity, logged >= MIN_CURVE_POINTS, "fewer than two pruning steps logged")
    if run.masks is None:
        skipped.append(f"no {MASKS_DIR}/{MASKS_FILE} (the run has not finished): kept_structures.png skipped")
        if run.scores is not None:
            skipped.append(
                f"scores.png shows the final masks' choice: skipped until {MASKS_DIR}/{MASKS_FILE} exists"
            )
        return figures, skipped
    figures["kept_structures"] = plot_kept_structures
    if run.scores is not None:
        figures["scores"] = plot_scores
    elif run.kind == "oneshot":
        skipped.append(f"no {SCORES_FILE}: scores.png skipped")
    return figures, skipped
