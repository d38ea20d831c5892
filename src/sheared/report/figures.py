"""The figures of a run report, drawn on `matplotlib.figure.Figure` objects with the Agg canvas
(no pyplot, no display, no global backend switch).

| file                  | when           | shows                                                         |
|-----------------------|----------------|---------------------------------------------------------------|
| `losses.png`          | always         | training loss (raw + smoothed); per-domain eval loss          |
| `domain_losses.png`   | eval steps     | per-domain eval loss against its reference loss               |
| `domain_weights.png`  | always         | the domain mixture over steps (stacked)                       |
| `sparsity.png`        | pruning        | expected vs target sparsity per mask type; expected params    |
| `kept_structures.png` | finished prune | per layer: kept query heads, KV groups, MLP channels, layer    |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sheared.errors import UserError
from sheared.files import atomic_write
from sheared.report.run import RunData, count, series, smooth, smoothing_window, target_num_params, unit
from sheared.run_dir import (
    DOMAIN_WEIGHT,
    EVAL_KL,
    EVAL_LOSS,
    EXPECTED_SPARSITY,
    REFERENCE_LOSS,
    TARGET_SPARSITY,
)

DPI = 110
RAW_ALPHA = 0.25  # the raw per-step line is drawn light, under its smoothed line
KEPT_COLOR, PRUNED_COLOR, DROPPED_COLOR = "#1f77b4", "#eeeeee", "#bdbdbd"


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


def _new_figure(width: float, height: float):
    """A Figure on an Agg canvas (no pyplot: nothing global, nothing to close)."""
    Figure, FigureCanvasAgg = matplotlib_classes()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), binary=True)


def _raw_and_smoothed(ax, steps: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.8)
    ax.plot(steps, smooth(values, smoothing_window(len(values))), color=color, linewidth=1.8, label=label)


def plot_losses(run: RunData, path: Path) -> Path:
    """Training loss per step (raw and smoothed), and per-domain eval loss at eval steps if any."""
    evals = run.eval_records
    fig = _new_figure(11 if evals else 6.5, 4)
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    ax = axes[0]
    if run.pruning:
        steps, total = series(run.records, "loss")
        _raw_and_smoothed(ax, steps, total, "tab:orange", "total loss (LM + Lagrangian)")
    steps, lm = series(run.records, "lm_loss")
    _raw_and_smoothed(ax, steps, lm, "tab:blue", "LM loss")
    ax.set(title="training loss (light: per step; dark: smoothed)", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[1]
        for domain in run.domains:
            steps, values = series(evals, EVAL_LOSS + domain)
            ax.plot(steps, values, marker="o", markersize=3, label=domain)
        ax.set(title="eval loss per domain", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncols=1 + len(run.domains) // 8)
    return _save(fig, path)


def plot_distillation(run: RunData, path: Path) -> Path:
    """Distillation runs: CE and KD per step (raw and smoothed), per-domain eval KL to the teacher."""
    evals = [r for r in run.eval_records if any(k.startswith(EVAL_KL) for k in r)]
    fig = _new_figure(11 if evals else 6.5, 4)
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    for key, color, label in (
        ("ce_loss", "tab:blue", "CE (next token)"),
        ("kd_loss", "tab:red", "KD (KL to teacher)"),
    ):
        steps, values = series(run.records, key)
        _raw_and_smoothed(axes[0], steps, values, color, label)
    axes[0].set(title="distillation: the two terms of the loss", xlabel="step", ylabel="nats per token")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    if evals:
        ax = axes[1]
        for domain in run.domains:
            steps, values = series(evals, EVAL_KL + domain)
            ax.plot(steps, values, marker="o", markersize=3, label=domain)
        ax.set(title="eval KL(teacher ‖ model) per domain", xlabel="step", ylabel="nats per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncols=1 + len(run.domains) // 8)
    return _save(fig, path)


def plot_domain_losses(run: RunData, path: Path) -> Path:
    """One panel per domain: eval loss over eval steps, its reference loss dashed."""
    evals, domains = run.eval_records, run.domains
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
        if len(loss) and len(ref):
            title += f"\nfinal {loss[-1]:.3f} vs ref {ref[-1]:.3f} ({loss[-1] - ref[-1]:+.3f})"
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(domains) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize="small")
    return _save(fig, path)


def plot_domain_weights(run: RunData, path: Path) -> Path:
    """The domain mixture over steps, stacked so every column sums to 1."""
    fig = _new_figure(7.5, 3.8)
    ax = fig.subplots()
    domains = run.domains
    # Only steps that log every domain's weight, so that the stacked curves line up.
    records = [r for r in run.records if all(DOMAIN_WEIGHT + d in r for d in domains)]
    curves = [series(records, DOMAIN_WEIGHT + d) for d in domains]
    steps = curves[0][0]
    labels = [f"{d} ({values[-1]:.2f})" for d, (_, values) in zip(domains, curves)]
    ax.stackplot(steps, [values for _, values in curves], labels=labels, alpha=0.85)
    ax.set(
        title="domain weights (stacked; legend: final weight)", xlabel="step", ylabel="weight", ylim=(0, 1)
    )
    ax.margins(x=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", reverse=True)
    return _save(fig, path)


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


def plot_sparsity(run: RunData, path: Path) -> Path:
    """One panel per mask type: expected sparsity vs the (warmed-up) target; expected parameters."""
    names = run.mask_names
    has_params = any("expected_params" in r for r in run.records)
    rows, cols = _grid(len(names) + has_params)
    fig = _new_figure(3.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        steps, expected = series(run.records, EXPECTED_SPARSITY + name)
        t_steps, target = series(run.records, TARGET_SPARSITY + name)
        ax.plot(steps, expected, color="tab:blue", label="expected")
        ax.plot(t_steps, target, color="black", linestyle="--", label="target")
        ax.set_title(f"{name}\nfinal {expected[-1]:.3f}, target {target[-1]:.3f}", fontsize="medium")
        ax.set(xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    if names:
        axes[0].set_ylabel("sparsity")
        axes[0].legend(fontsize="small")
    if has_params:
        _params_panel(axes[len(names)], run)
    for ax in axes[len(names) + has_params :]:
        ax.set_visible(False)
    return _save(fig, path)


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


def plot_kept_structures(run: RunData, path: Path) -> Path:
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
    return _save(fig, path)
