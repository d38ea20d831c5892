"""`sheared report RUN_DIR`: figures and a markdown summary of a pruning or training run.

Reads what a run directory already holds (nothing is recomputed, nothing needs the model):

- `config.yaml`: a prune config has `pruning:` (target shape) and `source:`; a train config `model:`;
- `metrics.jsonl`: one JSON object per step (see `sheared.train.loop` for the keys);
- `masks/masks.pt` (finished pruning runs): the exact-target binary masks and both shapes.

and writes into `RUN_DIR/report/` (or `out_dir`):

| file                  | when           | shows                                                         |
|-----------------------|----------------|---------------------------------------------------------------|
| `losses.png`          | always         | training loss (raw + smoothed); per-domain eval loss          |
| `domain_losses.png`   | eval steps     | per-domain eval loss against its reference loss               |
| `domain_weights.png`  | always         | the domain mixture over steps (stacked)                       |
| `sparsity.png`        | pruning        | expected vs target sparsity per mask type; expected params    |
| `kept_structures.png` | finished prune | per layer: kept query heads, KV groups, MLP channels, layer    |
| `summary.md`          | always         | the numbers in tables, every figure embedded with what to see |

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, no
display, no global backend switch). Figures that have nothing to show are skipped and
`summary.md` says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sheared.errors import UserError
from sheared.pruning.target import MASK_TYPES
from sheared.train.loop import MASKS_DIR, MASKS_FILE
from sheared.train.metrics import METRICS_FILE

REPORT_DIR = "report"
SUMMARY_FILE = "summary.md"
CONFIG_FILE = "config.yaml"
# The smoothed training-loss line is an exponential moving average over about this fraction of
# the run (TensorBoard-style, bias-corrected), so its lag looks the same for 200 or 50,000 steps.
SMOOTHING_FRACTION = 1 / 25
DPI = 110
RAW_ALPHA = 0.25  # the raw per-step line is drawn light, under its smoothed line
KEPT_COLOR, PRUNED_COLOR, DROPPED_COLOR = "#1f77b4", "#eeeeee", "#bdbdbd"

EVAL_PREFIX, REFERENCE_PREFIX, WEIGHT_PREFIX = "eval_loss/", "reference_loss/", "domain_weight/"
EXPECTED_PREFIX, TARGET_PREFIX = "expected_sparsity/", "target_sparsity/"


# --- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from one run directory."""

    run_dir: Path
    """The run directory."""
    records: list[dict[str, Any]]
    """metrics.jsonl, one dict per step, in order."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config.yaml ({} when missing)."""
    masks: dict[str, Any] | None = None
    """masks/masks.pt ({"masks", "log_alpha", "target", "source"}), None when not (yet) written."""
    notes: list[str] = field(default_factory=list)
    """Things found missing or odd while loading, repeated in summary.md."""

    @property
    def pruning(self) -> bool:
        """A `sheared prune` run (its config has `pruning:`, or its metrics log sparsity)."""
        return "pruning" in self.config or bool(self.mask_names)

    @property
    def domains(self) -> list[str]:
        """Domains in the order the run logs them."""
        return _suffixes(self.records, WEIGHT_PREFIX, EVAL_PREFIX)

    @property
    def mask_names(self) -> list[str]:
        """Mask types the run learns, in MASK_TYPES order."""
        names = _suffixes(self.records, EXPECTED_PREFIX)
        order = {name: i for i, name in enumerate(MASK_TYPES)}
        return sorted(names, key=lambda n: order.get(n, len(order)))

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        """Records of the evaluation steps."""
        return [r for r in self.records if any(k.startswith(EVAL_PREFIX) for k in r)]


def _suffixes(records: list[dict[str, Any]], *prefixes: str) -> list[str]:
    """`x` of every key `prefix + x`, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            for prefix in prefixes:
                if key.startswith(prefix):
                    seen.setdefault(key[len(prefix) :], None)
    return list(seen)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics.jsonl, and notes.

    A half-written last line (a run writing while we read) is skipped with a note; any other line
    that is not a JSON object is a UserError naming it.
    """
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, notes = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError
        except ValueError:
            if i == last:
                notes.append(
                    f"the last line of {METRICS_FILE} is incomplete (the run is writing it); skipped"
                )
                continue
            raise UserError(
                f"{path} line {i + 1} is not a metrics record (a JSON object with 'step')"
            ) from None
        records.append(record)
    if not records:
        raise UserError(f"{path} has no records yet; run the report after the first step")
    return records, notes


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (config, metrics, final masks) into a RunData."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}; is it a run directory?")
    records, notes = read_records(metrics)
    config: dict[str, Any] = {}
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{config_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        notes.append(f"{CONFIG_FILE} not found; the run type is inferred from the metrics")
    masks = None
    masks_path = run_dir / MASKS_DIR / MASKS_FILE
    if masks_path.is_file():
        import torch

        try:
            masks = torch.load(masks_path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:  # e.g. caught while the run writes it
            notes.append(f"{MASKS_DIR}/{MASKS_FILE} cannot be read ({type(e).__name__}); read as missing")
    return RunData(run_dir=run_dir, records=records, config=config, masks=masks, notes=notes)


# --- small pure helpers --------------------------------------------------------------------------


def series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key`; "nan"/"inf" strings become floats."""
    pairs = [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def smooth(values: np.ndarray, window: float) -> np.ndarray:
    """Bias-corrected exponential moving average over about `window` points; skips non-finite values.

    Args:
        values: (N,) float.
        window: the EMA's span; 1 returns the values unchanged.

    Returns:
        (N,) float; NaN until the first finite value.
    """
    decay = 1.0 - 1.0 / max(window, 1.0)
    out = np.full(len(values), np.nan)
    mean, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            mean = decay * mean + (1 - decay) * v
            weight = decay * weight + (1 - decay)
        if weight > 0:
            out[i] = mean / weight
    return out


def smoothing_window(num_points: int) -> float:
    return max(1.0, num_points * SMOOTHING_FRACTION)


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(records):
        if key in record and record[key] is not None:
            return float(record[key])
    return None


def _fmt(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


# Units of parameter counts: (scale, suffix, digits shown).
COUNT_UNITS = ((1e9, "B", 2), (1e6, "M", 3), (1e3, "K", 1), (1.0, "", 0))


def _unit(n: float) -> tuple[float, str, int]:
    return next(u for u in COUNT_UNITS if abs(n) >= u[0] or u[0] == 1.0)


def _count(n: float) -> str:
    """A parameter count for people: 1.19 B, 2.370 M, 3.0 K."""
    scale, suffix, digits = _unit(n)
    return f"{n / scale:.{digits}f} {suffix}".rstrip()


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


# --- figures -------------------------------------------------------------------------------------


def _matplotlib():
    """(Figure, FigureCanvasAgg), or a UserError saying how to install the optional extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "sheared report needs matplotlib; install it with: pip install 'sheared[plots]'"
        ) from None
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float):
    """A Figure on an Agg canvas (no pyplot: nothing global, nothing to close)."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


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
            steps, values = series(evals, EVAL_PREFIX + domain)
            ax.plot(steps, values, marker="o", markersize=3, label=domain)
        ax.set(title="eval loss per domain", xlabel="step", ylabel="loss")
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
        steps, loss = series(evals, EVAL_PREFIX + domain)
        ref_steps, ref = series(evals, REFERENCE_PREFIX + domain)
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
    records = [r for r in run.records if all(WEIGHT_PREFIX + d in r for d in domains)]
    curves = [series(records, WEIGHT_PREFIX + d) for d in domains]
    steps = curves[0][0]
    labels = [f"{d} ({values[-1]:.2f})" for d, (_, values) in zip(domains, curves)]
    ax.stackplot(steps, [values for _, values in curves], labels=labels, alpha=0.85)
    ax.set(
        title="domain weights (stacked; legend: final weight)", xlabel="step", ylabel="weight", ylim=(0, 1)
    )
    ax.margins(x=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", reverse=True)
    return _save(fig, path)


def target_num_params(masks: dict[str, Any] | None) -> float | None:
    """Parameters of the target shape (from masks.pt's source args and target), or None."""
    if masks is None:
        return None
    from sheared.model.args import ModelArgs, parameter_counts
    from sheared.pruning.target import TargetShape

    source = ModelArgs(**masks["source"])
    return float(parameter_counts(TargetShape(**masks["target"]).model_args(source))["num_params"])


def _params_panel(ax, run: RunData) -> None:
    """Expected parameter count over steps, the target's dashed (when masks.pt tells it)."""
    steps, params = series(run.records, "expected_params")
    target = target_num_params(run.masks)
    scale, suffix, _ = _unit(params.max())
    ax.plot(steps, params / scale, color="tab:green", label="expected")
    title = f"parameters ({suffix or 'count'})\nfinal {_count(params[-1])}"
    if target is not None:
        ax.axhline(target / scale, color="black", linestyle="--", label="target")
        title += f", target {_count(target)}"
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
        steps, expected = series(run.records, EXPECTED_PREFIX + name)
        t_steps, target = series(run.records, TARGET_PREFIX + name)
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


# --- summary -------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shape(values: dict[str, Any]) -> str:
    return (
        f"{_plural(values['num_hidden_layers'], 'layer')}, hidden {values['hidden_size']}, "
        f"{_plural(values['num_attention_heads'], 'query head')} in "
        f"{_plural(values['num_key_value_heads'], 'KV group')}, intermediate {values['intermediate_size']}"
    )


def _header(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [f"# Run report: `{run.run_dir}`", ""]
    if run.pruning:
        lines.append("- **Run type:** pruning (`sheared prune`)")
        source = run.config.get("source", "?")
        if run.masks is not None:
            lines.append(f"- **Source:** `{source}` ({_shape(run.masks['source'])})")
            lines.append(f"- **Target:** {_shape(run.masks['target'])}")
        else:
            lines.append(f"- **Source:** `{source}`")
            target = run.config.get("pruning", {}).get("target")
            lines.append(f"- **Target:** {_shape(target) if isinstance(target, dict) else '?'}")
    else:
        lines.append("- **Run type:** training (`sheared train`, continued pretraining)")
        lines.append(f"- **Model:** `{run.config.get('model', '?')}`")
    planned = run.config.get("train", {}).get("steps")
    of = f" of {planned}" if planned else ""
    lines.append(f"- **Steps:** {last['step']}{of} ({last.get('tokens', 0):,} tokens)")
    loss = f"- **Final training loss:** LM {_fmt(_last(run.records, 'lm_loss'))}"
    if run.pruning:
        loss += f"; total incl. Lagrangian {_fmt(_last(run.records, 'loss'))}"
    lines.append(loss + f" (step {last['step']})")
    return lines


def _eval_table(run: RunData) -> list[str]:
    evals = run.eval_records
    if not evals:
        return ["## Evaluation", "", "No evaluation step yet: the eval figures are skipped.", ""]
    last = evals[-1]
    lines = [
        f"## Evaluation (step {last['step']})",
        "",
        "| domain | eval loss | reference loss | eval − reference |",
        "|---|---:|---:|---:|",
    ]
    for d in run.domains:
        loss, ref = last.get(EVAL_PREFIX + d), last.get(REFERENCE_PREFIX + d)
        gap = None if loss is None or ref is None else float(loss) - float(ref)
        lines.append(f"| {d} | {_fmt(loss)} | {_fmt(ref)} | {_fmt(gap, sign=True)} |")
    return [*lines, ""]


def _weights_table(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [f"## Domain weights (step {last['step']})", "", "| domain | weight |", "|---|---:|"]
    lines += [f"| {d} | {_fmt(last.get(WEIGHT_PREFIX + d))} |" for d in run.domains]
    return [*lines, ""]


def _sparsity_table(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [
        f"## Sparsity (step {last['step']})",
        "",
        "| mask | expected | target | expected − target |",
        "|---|---:|---:|---:|",
    ]
    for name in run.mask_names:
        expected, target = (
            _last(run.records, EXPECTED_PREFIX + name),
            _last(run.records, TARGET_PREFIX + name),
        )
        gap = None if expected is None or target is None else expected - target
        lines.append(f"| {name} | {_fmt(expected)} | {_fmt(target)} | {_fmt(gap, sign=True)} |")
    params = _last(run.records, "expected_params")
    if params is not None:
        target = target_num_params(run.masks)
        suffix = f" (target {_count(target)})" if target is not None else ""
        lines += ["", f"Expected parameters: {_count(params)}{suffix}."]
    return [*lines, ""]


def _kept_section(run: RunData) -> list[str]:
    if run.masks is None:
        return [
            "## Kept structure",
            "",
            f"No `{MASKS_DIR}/{MASKS_FILE}` yet (the run has not finished): the kept-structure figure is skipped.",
            "",
        ]
    from sheared.model.args import ModelArgs
    from sheared.model.masks import Masks
    from sheared.pruning.compaction import kept_structure

    source = ModelArgs(**run.masks["source"])
    kept = kept_structure(source, Masks(**run.masks["masks"]))
    layers = ", ".join(str(k.source_index) for k in kept.layers)
    lines = [
        "## Kept structure",
        "",
        f"Kept layers: {layers} ({len(kept.layers)} of {source.num_hidden_layers}); "
        f"hidden size {len(kept.hidden)} of {source.hidden_size}.",
        "",
        "| layer | KV heads | query heads | intermediate |",
        "|---:|---|---|---:|",
    ]
    for k in kept.layers:
        heads = ", ".join(map(str, k.query_heads))
        groups = ", ".join(map(str, k.kv_heads))
        lines.append(
            f"| {k.source_index} | {groups} | {heads} | {len(k.intermediate)} / {source.intermediate_size} |"
        )
    return [*lines, ""]


# What each figure is for, one sentence under it in summary.md.
CAPTIONS = {
    "losses": "The smoothed LM loss should fall steadily; while pruning, the total loss differs from it "
    "by the Lagrangian term, which should go to about zero once the expected sparsity meets the target.",
    "domain_losses": "Dynamic batch loading raises the weight of domains whose eval loss is above the "
    "dashed reference line, so the gaps should shrink over time.",
    "domain_weights": "Weights move towards the domains that lag their reference loss; a domain that "
    "takes over the mixture, or weights that oscillate, suggest a noisy evaluation.",
    "sparsity": "Each expected sparsity should follow its dashed target (which rises during the "
    "Lagrangian warm-up) and end on it; a persistent gap means the multipliers have not converged.",
    "kept_structures": "Which layers, KV groups, query heads and MLP channels the exact-target masks "
    "keep; every kept layer has the same counts, the positions can differ.",
}


def _figures_section(made: dict[str, str]) -> list[str]:
    lines = ["## Figures", ""]
    for name, file in made.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({file})", "", CAPTIONS[name], ""]
    return lines


def summary_markdown(run: RunData, made: dict[str, str], skipped: list[str]) -> str:
    """summary.md: header, tables, skipped figures with their reason, the figures embedded."""
    lines = [*_header(run), ""]
    if run.notes or skipped:
        lines += ["## Notes", "", *[f"- {note}" for note in [*run.notes, *skipped]], ""]
    lines += _eval_table(run) + _weights_table(run)
    if run.pruning:
        lines += _sparsity_table(run) + _kept_section(run)
    lines += _figures_section(made)
    return "\n".join(lines).rstrip() + "\n"


# --- the command ---------------------------------------------------------------------------------


def _plan(run: RunData) -> tuple[dict[str, Callable[[RunData, Path], Path]], list[str]]:
    """The figures this run can have, and a line for each one skipped."""
    figures: dict[str, Callable[[RunData, Path], Path]] = {"losses": plot_losses}
    skipped = []
    if run.eval_records:
        figures["domain_losses"] = plot_domain_losses
    else:
        skipped.append("no evaluation step yet: domain_losses.png skipped")
    if run.domains:
        figures["domain_weights"] = plot_domain_weights
    else:
        skipped.append("no domain weights logged: domain_weights.png skipped")
    if not run.pruning:
        skipped.append("not a pruning run: no sparsity.png or kept_structures.png")
        return figures, skipped
    figures["sparsity"] = plot_sparsity
    if run.masks is not None:
        figures["kept_structures"] = plot_kept_structures
    else:
        skipped.append(f"no {MASKS_DIR}/{MASKS_FILE} (the run has not finished): kept_structures.png skipped")
    return figures, skipped


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the figures and summary.md of a run; returns the path of summary.md.

    Args:
        run_dir: a directory written by `sheared prune` or `sheared train` (finished or not).
        out_dir: where to write; default `RUN_DIR/report/`. Files of an earlier report there are
            replaced.

    Raises:
        UserError: `run_dir` has no metrics.jsonl, or it cannot be read.
    """
    _matplotlib()  # before anything is written
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / REPORT_DIR
    figures, skipped = _plan(run)
    out.mkdir(parents=True, exist_ok=True)
    made = {name: plot(run, out / f"{name}.png").name for name, plot in figures.items()}
    path = out / SUMMARY_FILE
    path.write_text(summary_markdown(run, made, skipped))
    return path
