"""`sheared report RUN_DIR`: the figures and `summary.md` of a pruning or training run.

Writes into `RUN_DIR/report/` (or `out_dir`) the figures of `sheared.report.figures` that the run
can have, and `summary.md`: the numbers in tables, every figure embedded with what to look for.
Figures that have nothing to show are skipped and `summary.md` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sheared.files import atomic_write_text, guard_writes
from sheared.model.args import describe
from sheared.report.figures import (
    matplotlib_classes,
    plot_distillation,
    plot_domain_losses,
    plot_domain_weights,
    plot_kept_structures,
    plot_losses,
    plot_sparsity,
)
from sheared.report.run import RunData, count, fmt, last_value, load_run, target_num_params
from sheared.run_dir import (
    DOMAIN_WEIGHT,
    EVAL_LOSS,
    EXPECTED_SPARSITY,
    MASKS_DIR,
    MASKS_FILE,
    REFERENCE_LOSS,
    TARGET_SPARSITY,
    RunDir,
)

SUMMARY_FILE = "summary.md"


def _header(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [f"# Run report: `{run.run_dir}`", ""]
    if run.pruning:
        lines.append("- **Run type:** pruning (`sheared prune`)")
        source = run.config.get("source", "?")
        if run.masks is not None:
            lines.append(f"- **Source:** `{source}` ({describe(run.masks['source'])})")
            lines.append(f"- **Target:** {describe(run.masks['target'])}")
        else:
            lines.append(f"- **Source:** `{source}`")
            target = run.config.get("pruning", {}).get("target")
            lines.append(f"- **Target:** {describe(target) if isinstance(target, dict) else '?'}")
    else:
        lines.append("- **Run type:** training (`sheared train`, continued pretraining)")
        lines.append(f"- **Model:** `{run.config.get('model', '?')}`")
    planned = run.config.get("train", {}).get("steps")
    of = f" of {planned}" if planned else ""
    lines.append(f"- **Steps:** {last['step']}{of} ({last.get('tokens', 0):,} tokens)")
    loss = f"- **Final training loss:** LM {fmt(last_value(run.records, 'lm_loss'))}"
    if run.pruning:
        loss += f"; total incl. Lagrangian {fmt(last_value(run.records, 'loss'))}"
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
        loss, ref = last.get(EVAL_LOSS + d), last.get(REFERENCE_LOSS + d)
        gap = None if loss is None or ref is None else float(loss) - float(ref)
        lines.append(f"| {d} | {fmt(loss)} | {fmt(ref)} | {fmt(gap, sign=True)} |")
    return [*lines, ""]


def _weights_table(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [f"## Domain weights (step {last['step']})", "", "| domain | weight |", "|---|---:|"]
    lines += [f"| {d} | {fmt(last.get(DOMAIN_WEIGHT + d))} |" for d in run.domains]
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
            last_value(run.records, EXPECTED_SPARSITY + name),
            last_value(run.records, TARGET_SPARSITY + name),
        )
        gap = None if expected is None or target is None else expected - target
        lines.append(f"| {name} | {fmt(expected)} | {fmt(target)} | {fmt(gap, sign=True)} |")
    params = last_value(run.records, "expected_params")
    if params is not None:
        target = target_num_params(run.masks)
        suffix = f" (target {count(target)})" if target is not None else ""
        lines += ["", f"Expected parameters: {count(params)}{suffix}."]
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
    "distillation": "With a teacher the loss mixes next-token CE and the KL to the teacher; the eval KL "
    "per domain shows where the student still differs from its teacher (it should fall while training).",
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
    if any("kd_loss" in r for r in run.records):
        figures["distillation"] = plot_distillation
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
    matplotlib_classes()  # before anything is written
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else RunDir(run.run_dir).report
    figures, skipped = _plan(run)
    with guard_writes(out):
        out.mkdir(parents=True, exist_ok=True)
    made = {name: plot(run, out / f"{name}.png").name for name, plot in figures.items()}
    path = out / SUMMARY_FILE
    atomic_write_text(path, summary_markdown(run, made, skipped))
    return path
