"""`sheared report RUN_DIR`: the figures and `summary.md` of a pruning or training run.

Writes into `RUN_DIR/report/` (or `out_dir`) the figures of `sheared.report.figures` that the run
has data for, and `summary.md`: the numbers in tables, every figure embedded with what to look for.
Figures that have nothing to show are not drawn and `summary.md` says why. A one-shot pruning run
(no training steps) is described as one: its method and calibration, the pruned model's eval loss,
its kept structures and scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sheared.files import atomic_write_text, guard_writes
from sheared.model.args import describe
from sheared.report.figures import FIGURE_NAMES, matplotlib_classes, plan_figures, save_figure
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
# How each one-shot `pruning.method` scores the structures (sheared.pruning.importance).
ONESHOT_SCORES = {
    "activation": "activation importance",
    "magnitude": "weight magnitude (no data)",
    "random": "random scores (the sanity floor)",
}


def _oneshot_type(run: RunData) -> str:
    """`one-shot pruning by activation importance on 512 calibration tokens (8 sequences)`, from the
    config and scores.pt (the metrics record's tokens when scores.pt is missing)."""
    calibration: dict[str, Any] = (run.scores or {}).get("calibration", {})
    method = run.method or calibration.get("method", "?")
    text = f"one-shot pruning by {ONESHOT_SCORES.get(method, f'{method} scores')}"
    if calibration.get("reused_from"):
        return f"{text}, scores reused from `{calibration['reused_from']}`"
    if method == "random" and "seed" in run.config.get("train", {}):
        return f"{text}, seed {run.config['train']['seed']}"
    tokens = calibration.get("calibration_tokens") or run.records[-1].get("tokens")
    if method != "activation" or not tokens:
        return text
    sequences = calibration.get("calibration_sequences")
    passes = " × 2 passes: widths scored again without the dropped layers"
    passes = passes if calibration.get("width_scores") == "after_depth" else ""
    detail = f" ({sequences} sequences{passes})" if sequences else ""
    return f"{text} on {tokens:,} calibration tokens{detail}"


def _run_type(run: RunData) -> str:
    if run.kind == "oneshot":
        method = f", `pruning.method: {run.method}`" if run.method else ""
        return f"{_oneshot_type(run)}; no training steps (`sheared prune`{method})"
    if run.kind == "prune":
        return "pruning with learned masks (`sheared prune`, `pruning.method: l0`)"
    return "training (`sheared train`, continued pretraining)"


def _header(run: RunData) -> list[str]:
    last = run.records[-1]
    lines = [f"# Run report: `{run.run_dir}`", "", f"- **Run type:** {_run_type(run)}"]
    if run.pruning:
        source = run.config.get("source", "?")
        if run.masks is not None:
            lines.append(f"- **Source:** `{source}` ({describe(run.masks['source'])})")
            lines.append(f"- **Target:** {describe(run.masks['target'])}")
        else:
            lines.append(f"- **Source:** `{source}`")
            target = run.config.get("pruning", {}).get("target")
            lines.append(f"- **Target:** {describe(target) if isinstance(target, dict) else '?'}")
    else:
        lines.append(f"- **Model:** `{run.config.get('model', '?')}`")
    if run.kind == "oneshot":
        return lines
    planned = run.config.get("train", {}).get("steps")
    of = f" of {planned}" if planned else ""
    shortened = last_value(run.records, "last_step")
    if shortened is not None and planned and shortened < planned:
        of = f" of {planned} planned: a deadline moved the last step to {int(shortened)}, the learning rate decayed by then"
    lines.append(f"- **Steps:** {last['step']}{of} ({last.get('tokens', 0):,} tokens)")
    lm = last_value(run.records, "lm_loss")
    if lm is not None:
        loss = f"- **Final training loss:** LM {fmt(lm)}"
        if run.has_lagrangian:
            loss += f"; total incl. Lagrangian {fmt(last_value(run.records, 'loss'))}"
        lines.append(loss + f" (step {last['step']})")
    return lines


def _eval_table(run: RunData) -> list[str]:
    evals = run.eval_records
    if not evals:
        return ["## Evaluation", "", "No evaluation step yet: the eval figures are skipped.", ""]
    last = evals[-1]
    title = "of the pruned model (no training)" if run.kind == "oneshot" else f"(step {last['step']})"
    lines = [
        f"## Evaluation {title}",
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
    from sheared.model.args import ModelArgs, parameter_counts
    from sheared.model.masks import Masks
    from sheared.pruning.compaction import kept_structure

    source = ModelArgs(**run.masks["source"])
    kept = kept_structure(source, Masks(**run.masks["masks"]))
    layers = ", ".join(str(k.source_index) for k in kept.layers)
    num_params = target_num_params(run.masks)
    assert num_params is not None, "masks.pt holds the target"
    lines = [
        "## Kept structure",
        "",
        f"Kept layers: {layers} ({len(kept.layers)} of {source.num_hidden_layers}); "
        f"hidden size {len(kept.hidden)} of {source.hidden_size}; "
        f"{count(num_params)} parameters of the source's {count(parameter_counts(source)['num_params'])}.",
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
    "losses": "The LM loss should fall steadily (on long runs a smoothed line is drawn over the per-step "
    "one).",
    "domain_losses": "Dynamic batch loading raises the weight of domains whose eval loss is above the "
    "dashed reference line, so the gaps should shrink over time.",
    "domain_weights": "Weights move towards the domains that lag their reference loss; a domain that "
    "takes over the mixture, or weights that oscillate, suggest a noisy evaluation.",
    "sparsity": "Each expected sparsity should follow its dashed target (which rises during the "
    "warm-up, `pruning.lagrangian_warmup_fraction`) and end on it; the projection controller holds it "
    "there after every step, and with the Lagrangian controller a persistent gap means the multipliers "
    "have not converged.",
    "distillation": "With a teacher the loss mixes next-token CE and the KL to the teacher; the eval KL "
    "per domain shows where the student still differs from its teacher (it should fall while training).",
    "kept_structures": "Which layers, KV groups, query heads and MLP channels the exact-target masks "
    "keep; every kept layer has the same counts, the positions can differ.",
    "scores": "Every structure's score, sorted within the group it competes in (a layer's channels, a KV "
    "group's heads); one-shot pruning keeps the top of each group, left of the dashed cut. A steep drop "
    "at the cut means a clear choice; a flat curve there means near-ties decided it.",
}
# Learned runs with scores.pt started their masks from those scores (`pruning.init`).
LEARNED_SCORES_CAPTION = (
    "The scores the learned masks started from (`pruning.init`), sorted within each group, coloured by "
    "the final learned masks: grey points left of the dashed cut, or blue ones right of it, are where "
    "training changed the ranking's choice."
)


LAGRANGIAN_CAPTION = (
    " The total loss differs from it by the Lagrangian term, which should go to about zero once the "
    "expected sparsity meets the target."
)


def _caption(run: RunData, name: str) -> str:
    if name == "scores" and run.kind == "prune":
        return LEARNED_SCORES_CAPTION
    if name == "losses" and run.has_lagrangian:
        return CAPTIONS[name] + LAGRANGIAN_CAPTION
    return CAPTIONS[name]


def _figures_section(run: RunData, made: dict[str, str]) -> list[str]:
    lines = ["## Figures", ""]
    for name, file in made.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({file})", "", _caption(run, name), ""]
    return lines


def summary_markdown(run: RunData, made: dict[str, str], skipped: list[str]) -> str:
    """summary.md: header, tables, skipped figures with their reason, the figures embedded."""
    lines = [*_header(run), ""]
    if run.notes or skipped:
        lines += ["## Notes", "", *[f"- {note}" for note in [*run.notes, *skipped]], ""]
    lines += _eval_table(run)
    if run.kind != "oneshot":  # a one-shot run's weights are only the initial mixture
        lines += _weights_table(run)
    if run.kind == "prune":
        lines += _sparsity_table(run)
    if run.pruning:
        lines += _kept_section(run)
    lines += _figures_section(run, made)
    return "\n".join(lines).rstrip() + "\n"


# --- the command ---------------------------------------------------------------------------------


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the figures and summary.md of a run; returns the path of summary.md.

    Args:
        run_dir: a directory written by `sheared prune` (learned or one-shot) or `sheared train`
            (finished or not).
        out_dir: where to write; default `RUN_DIR/report/`. Files of an earlier report there are
            replaced, and its figures this report does not draw are removed.

    Raises:
        UserError: `run_dir` has no metrics.jsonl, or it cannot be read.
    """
    matplotlib_classes()  # before anything is written
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else RunDir(run.run_dir).report
    figures, skipped = plan_figures(run)
    with guard_writes(out):
        out.mkdir(parents=True, exist_ok=True)
    made = {name: save_figure(draw(run), out / f"{name}.png").name for name, draw in figures.items()}
    path = out / SUMMARY_FILE
    if path.is_file():  # an earlier report: its figures this run no longer has data for would mislead
        for name in FIGURE_NAMES:
            if name not in made:
                (out / f"{name}.png").unlink(missing_ok=True)
    atomic_write_text(path, summary_markdown(run, made, skipped))
    return path
