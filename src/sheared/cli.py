"""The `sheared` command line: argparse subcommands mapped to plain functions; nothing else.

User mistakes (`UserError`) print one line `sheared: error: ...` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sheared.errors import UserError


def _info_fields() -> tuple[str, ...]:
    from sheared.model.args import SHAPE_FIELDS

    return ("family", *SHAPE_FIELDS)


def source_info(spec: str) -> dict:
    """Shape and parameter counts of a source, read from its config only (no weights loaded)."""
    from sheared.model import parameter_counts, read_source_config

    args, _, path = read_source_config(spec)
    info = {name: getattr(args, name) for name in _info_fields()}
    info.update(parameter_counts(args))
    info["source"] = str(path)
    return info


def cmd_info(ns: argparse.Namespace) -> int:
    info = source_info(ns.source)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def cmd_study(ns: argparse.Namespace) -> int:
    from sheared.config import load_config
    from sheared.study import StudyConfig, run_study

    run_study(load_config(StudyConfig, ns.config, ns.overrides), ns.out)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from sheared.config import load_config
    from sheared.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, ns.config, ns.overrides), ns.run_dir)
    return 0


def cmd_sample_corpus(ns: argparse.Namespace) -> int:
    from sheared.data.corpus import build_sample_corpus

    reports = build_sample_corpus(ns.out, ns.domains or None, cache_dir=ns.cache_dir, progress=True)
    print(f"{'domain':<14}{'documents':>10}{'MB':>8}  status")
    for r in reports:
        status = "cached" if r.cached else ("built" if r.documents else "not built")
        print(f"{r.domain:<14}{r.documents:>10,}{r.characters / 1e6:>8.1f}  {status}")
        for line in r.skipped:
            print(f"{'':<14}skipped: {line}")
    print(f"corpus in {ns.out}")
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    from sheared.config import load_config, parse_overrides
    from sheared.data.prepare import PrepareConfig, prepare_config_from_flags, prepare_data

    if ns.config:
        cfg = load_config(PrepareConfig, ns.config, ns.overrides)
    else:
        if not ns.out:
            raise UserError("give --config FILE, or --out DIR with --corpus DIR or --domain NAME=PATH")
        cfg = prepare_config_from_flags(ns.out, ns.domain or [], ns.corpus, **parse_overrides(ns.overrides))
    metadata = prepare_data(cfg, progress=True)
    print(f"{'domain':<14}{'train seq':>10}{'eval seq':>10}{'train tokens':>14}")
    for name, entry in metadata["domains"].items():
        train, evals = entry["splits"]["train"], entry["splits"]["eval"]
        print(f"{name:<14}{train['sequences']:>10,}{evals['sequences']:>10,}{train['tokens']:>14,}")
    print(f"prepared data in {cfg.out_dir} (seq_len {metadata['seq_len']}, {metadata['dtype']})")
    return 0


def cmd_reference_loss(ns: argparse.Namespace) -> int:
    from sheared.config import read_yaml
    from sheared.data.dbl import fit_reference_losses, fit_scaling_law

    spec = read_yaml(ns.losses)
    if set(spec) != {"num_params", "losses"} or not isinstance(spec["losses"], dict):
        raise UserError(
            f"{ns.losses} must hold exactly two keys: num_params (a list of model sizes) and losses "
            f"(domain -> one loss per size); got {sorted(spec)}"
        )
    sizes, losses = spec["num_params"], spec["losses"]
    predicted = fit_reference_losses(sizes, losses, ns.target_params)
    fits = {d: dict(zip("abc", fit_scaling_law(sizes, v))) for d, v in losses.items()}
    print(f"L(N) = a / N^b + c, predicted at N = {ns.target_params:,}")
    print(f"{'domain':<16}{'a':>12}{'b':>9}{'c':>9}{'predicted':>11}")
    for d, value in predicted.items():
        f = fits[d]
        print(f"{d:<16}{f['a']:>12.4f}{f['b']:>9.4f}{f['c']:>9.4f}{value:>11.4f}")
    if ns.out:
        result = {"target_num_params": ns.target_params, "reference_losses": predicted, "fits": fits}
        _write_json_new(ns.out, result, ns.force)
        print(f"wrote {ns.out}")
    return 0


def _run_command(ns: argparse.Namespace, config_cls: type) -> int:
    from sheared.config import load_config

    cfg = load_config(config_cls, ns.config, ns.overrides)
    if ns.dry_run:
        from sheared.train.plan import plan

        print(plan(cfg, ns.run_dir))
        return 0
    if ns.run_dir is None:
        raise UserError("--run-dir is required to run (only --dry-run works without it)")
    from sheared.train.loop import run

    result = run(cfg, ns.run_dir, resume=ns.resume, restart=ns.restart)
    if not result.ran:  # a finished run, left as it is: the line saying so is printed
        return 0
    if result.eval_losses:
        losses = ", ".join(f"{d} {v:.3f}" for d, v in result.eval_losses.items())
        print(f"final eval loss per domain: {losses}")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_prune(ns: argparse.Namespace) -> int:
    from sheared.train.config import PruneConfig

    return _run_command(ns, PruneConfig)


def cmd_train(ns: argparse.Namespace) -> int:
    from sheared.train.config import TrainConfig

    return _run_command(ns, TrainConfig)


def cmd_plan_target(ns: argparse.Namespace) -> int:
    from sheared.pruning.target import TargetBudget
    from sheared.train.plan import target_plan

    budget = TargetBudget(
        params=ns.params, params_fraction=ns.params_fraction, memory_mb=ns.memory_mb, dtype=ns.dtype
    )
    print(
        target_plan(
            ns.source,
            budget,
            width_multiple=ns.width_multiple,
            top=ns.top,
            data=ns.data,
            calibration=ns.calibration,
            candidates=ns.candidates,
            precision=ns.precision,
        )
    )
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from sheared.export.command import export_command

    return export_command(
        ns.run, ns.out, force=ns.force, dtype=ns.dtype, gguf=ns.gguf, gguf_type=ns.gguf_type
    )


def cmd_eval(ns: argparse.Namespace) -> int:
    from sheared.eval.evaluate import evaluate, format_results, write_results
    from sheared.eval.throughput import ThroughputSettings

    if ns.out:
        _check_new_file(ns.out, ns.force)
    settings = None
    if ns.throughput:
        settings = ThroughputSettings(
            batch_size=ns.tp_batch_size,
            seq_len=ns.tp_seq_len,
            new_tokens=ns.tp_new_tokens,
            rounds=ns.tp_rounds,
            dtype=ns.tp_dtype,
        )
    tasks = [t for item in ns.tasks or [] for t in item.split(",") if t]
    results = evaluate(
        ns.models,
        data_dir=ns.data,
        tasks=tasks,
        include_path=ns.include_path,
        limit=ns.limit,
        num_fewshot=ns.num_fewshot,
        throughput=settings,
        batch_size=ns.batch_size,
        max_eval_sequences=ns.max_eval_sequences,
    )
    print(format_results(results))
    if ns.out:
        write_results(results, ns.out)
        print(f"\nwrote {ns.out}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from sheared.report import write_report

    out = write_report(ns.run_dir, ns.out)
    print(f"report: {out} (plots beside it)")
    return 0


def _check_new_file(path: str, force: bool) -> None:
    from pathlib import Path

    if Path(path).exists() and not force:
        raise UserError(f"{path} already exists; choose another --out or pass --force to replace it")


def _write_json_new(path: str, data: dict, force: bool) -> None:
    from sheared.files import atomic_write_json

    _check_new_file(path, force)
    atomic_write_json(path, data)


PRUNE_HELP = (
    "prune to an exact target shape: masks learned while training (pruning.method=l0, the default) "
    "or one-shot from activation, magnitude or random scores (no training steps)"
)
PRUNE_DESCRIPTION = (
    "Prune the config's source to pruning.target (an exact shape, or a budget turned into one) and "
    "write a run directory that `sheared export` turns into a smaller model. "
    "pruning.method=l0 (the default) learns hard-concrete masks over layers, KV groups, heads, MLP "
    "channels and hidden dims while training, with dynamic batch loading; pruning.controller=projection "
    "(the default) holds them on the warmed-up target after every step, lagrangian is the paper's "
    "Lagrangian constraint; pruning.init=activation|magnitude starts them from a one-shot ranking and "
    "pruning.init=oneshot from the one-shot choice itself. pruning.method=activation|magnitude|random "
    "prunes one-shot instead: every structure is scored (activations on pruning.calibration sequences "
    "per domain, weight norms, or seeded random), the top-scored structures are kept, and there are "
    "no training steps. docs/method.md has the details."
)
TRAIN_HELP = "continued pretraining with dynamic batch loading (and distillation with distill.teacher)"
TRAIN_DESCRIPTION = (
    "Continue pretraining a model (an export of `sheared prune`, or any source) on prepared data, "
    "reweighting the domains online by dynamic batch loading; distill.teacher adds a KL term to a "
    "teacher of the same tokenizer. An export carries its pruning run's data stream and domain weights on."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sheared",
        description="Prune a pretrained LLaMA-family model to an exact smaller shape (masks learned "
        "while training, as in Sheared LLaMA, or one-shot from importance scores), export it as a "
        "verified Hugging Face checkpoint, then continue pretraining it.",
        epilog="`sheared COMMAND --help` says more about each command; README.md walks through the pipeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="shape and parameter counts of a source model")
    p.add_argument("source", help="a Hugging Face model directory, a .gguf file, or smollm2-135m")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="sample corpus, tokenize-and-pack, reference losses")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("sample-corpus", help="assemble the real offline multi-domain sample corpus")
    p.add_argument("--out", required=True, help="folder for <domain>.jsonl files (cached: built once)")
    p.add_argument("--domains", nargs="*", help="only these domains (default: all seven)")
    p.add_argument("--cache-dir", default=None, help="downloads and unpacked packages (default: OUT/.cache)")
    p.set_defaults(func=cmd_sample_corpus)

    p = data_sub.add_parser("prepare", help="tokenize and pack domains into token files with eval splits")
    p.add_argument("--config", default=None, help="YAML file of PrepareConfig values")
    p.add_argument("--out", default=None, help="output folder (without --config)")
    p.add_argument(
        "--corpus", default=None, help="every *.jsonl in this folder is a domain (without --config)"
    )
    p.add_argument("--domain", action="append", help="NAME=PATH[,PATH...] (repeatable; without --config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seq_len=512 source=path/to/model")
    p.set_defaults(func=cmd_prepare)

    p = data_sub.add_parser("reference-loss", help="fit a / N^b + c per domain and predict at a size")
    p.add_argument(
        "--losses", required=True, help="YAML/JSON with num_params: [...] and losses: {domain: [...]}"
    )
    p.add_argument("--target-params", required=True, type=int, help="total parameters of the target model")
    p.add_argument("--out", default=None, help="write the predictions and fits as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_reference_loss)

    for name, func, what, description in (
        ("prune", cmd_prune, PRUNE_HELP, PRUNE_DESCRIPTION),
        ("train", cmd_train, TRAIN_HELP, TRAIN_DESCRIPTION),
    ):
        p = sub.add_parser(name, help=what, description=description)
        p.add_argument("--config", required=True, help="YAML run config (see configs/)")
        p.add_argument(
            "--run-dir",
            default=None,
            help="where the run's config, metrics and checkpoints go, and a pruning run's final masks "
            "and scores.pt (not for --dry-run)",
        )
        again = p.add_mutually_exclusive_group()
        again.add_argument(
            "--resume",
            action="store_true",
            help="continue from the newest intact checkpoint in --run-dir (a finished run is left as it "
            "is; an unfinished one-shot run, which has no checkpoint, is done again)",
        )
        again.add_argument(
            "--restart",
            action="store_true",
            help="move the run in --run-dir aside to RUN.replaced-N/ and start again from step 0",
        )
        p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 optim.lr=3e-4")
        p.set_defaults(func=func)

    p = sub.add_parser("plan-target", help="the valid shapes within 1%% of a size budget, ranked (no run)")
    p.add_argument("source", help="a Hugging Face model directory, a .gguf file, or smollm2-135m")
    p.add_argument(
        "--params", default=None, help="total parameters of the pruned model: 60M, 1.3B, 60_000_000"
    )
    p.add_argument(
        "--params-fraction", type=float, default=None, help="share of the source's non-embedding parameters"
    )
    p.add_argument("--memory-mb", type=float, default=None, help="size of all weights in MB (10^6 bytes)")
    p.add_argument("--dtype", default=None, help="with --memory-mb: float32, bfloat16, float16 or int8")
    p.add_argument(
        "--width-multiple", type=int, default=64, help="hidden and intermediate widths are multiples of this"
    )
    p.add_argument("--top", type=int, default=10, help="candidates shown")
    p.add_argument("--data", default=None, help="prepared data: measure the calibration losses as a run does")
    p.add_argument("--calibration", type=int, default=8, help="with --data: calibration sequences per domain")
    p.add_argument("--candidates", type=int, default=8, help="with --data: candidates measured")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="with --data: as train.precision",
    )
    p.set_defaults(func=cmd_plan_target)

    p = sub.add_parser("export", help="masks -> a verified standard Hugging Face checkpoint (and GGUF file)")
    p.add_argument(
        "run",
        help="a run directory (its newest checkpoint; a one-shot run: the source's weights under its "
        "masks), one checkpoint folder, or (with --gguf) an export",
    )
    p.add_argument("--out", default=None, help="output directory (must be new or empty); not for an export")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a previous export in --out (or its GGUF file of that type)",
    )
    p.add_argument("--dtype", default="float32", help="dtype of the saved weights: float32 or bfloat16")
    p.add_argument(
        "--gguf",
        action="store_true",
        help="also write a verified llama.cpp GGUF file OUT/model-<type>.gguf (llama and mistral families)",
    )
    p.add_argument("--gguf-type", default=None, help="f32, f16 (default) or q8_0; implies --gguf")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="per-domain perplexity, lm-eval tasks and throughput of models")
    p.add_argument("models", nargs="+", help="models: HF directories, .gguf files or smollm2-135m")
    p.add_argument(
        "--data", default=None, help="prepared data: per-domain loss and perplexity on its eval split"
    )
    p.add_argument(
        "--tasks", action="append", help="lm-eval task names, comma-separated (needs the eval extra)"
    )
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (local data)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--max-eval-sequences", type=int, default=None, help="per-domain: at most this many per domain"
    )
    p.add_argument(
        "--throughput", action="store_true", help="measure forward and generation tokens/s, in turns"
    )
    p.add_argument("--tp-batch-size", type=int, default=4, help="throughput: batch size")
    p.add_argument("--tp-seq-len", type=int, default=256, help="throughput: forward sequence length")
    p.add_argument("--tp-new-tokens", type=int, default=32, help="throughput: generated tokens")
    p.add_argument("--tp-rounds", type=int, default=3, help="throughput: measured rounds")
    p.add_argument("--tp-dtype", default="float32", help="throughput: float32 or bfloat16")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report",
        help="plots and summary.md of a run: learned or one-shot pruning, or continued pretraining",
        description="Write RUN_DIR/report/summary.md and the plots the run has data for: losses, "
        "domain losses and weights, sparsity (runs with training steps), kept structures and scores "
        "(pruning runs). A one-shot run has no training steps and gets only the last two.",
    )
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("study", help="learned vs one-shot pruning, distillation and DBL at equal tokens")
    p.add_argument("--config", required=True, help="YAML StudyConfig (see configs/smollm2-135m/study.yaml)")
    p.add_argument("--out", required=True, help="folder of the arms and results (re-runs skip finished arms)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. budget_tokens=600000 arms=[activation]"
    )
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded SmolLM2-135M on a CPU, within a time budget "
        "(one-shot prune, export, continue, evaluate, report)",
    )
    p.add_argument("--config", default=None, help="YAML file of DemoConfig values (optional)")
    p.add_argument("--run-dir", default="runs/demo", help="where results and the resolved config go")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_new_tokens=20")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"sheared: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
