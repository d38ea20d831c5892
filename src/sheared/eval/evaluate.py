"""`sheared eval`: per-domain loss and perplexity, lm-eval tasks, and throughput of one or more models."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sheared.errors import UserError
from sheared.eval.domain_loss import domain_losses
from sheared.eval.table import text_table
from sheared.eval.throughput import ThroughputSettings, load_hf_model, measure_throughput
from sheared.files import atomic_write_json
from sheared.model import load_source
from sheared.precision import torch_dtype


def model_names(specs: Sequence[str]) -> dict[str, str]:
    """Short unique display names for model specs (folder or file names)."""
    names: dict[str, str] = {}
    for spec in specs:
        base = Path(spec).name or str(spec)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names[name] = spec
    return names


def per_domain(
    spec: str, data_dir: str, batch_size: int, max_sequences: int | None, split: str = "eval"
) -> dict[str, dict[str, float]]:
    """domain -> {"loss", "perplexity"} of one model on a split of prepared data (the held-out one)."""
    from sheared.data.tokens import PreparedData

    source = load_source(spec)
    data = PreparedData.open(data_dir)
    data.check_tokenizer(source.tokenizer)
    losses = domain_losses(
        source.model.eval(), data, split=split, batch_size=batch_size, max_sequences=max_sequences
    )
    return {d: {"loss": v, "perplexity": math.exp(v)} for d, v in losses.items()}


def _hf_dir_for(spec: str, tmp: Path) -> Path:
    """A Hugging Face directory of the model (GGUF and embedded sources are written to `tmp`)."""
    from sheared.model import save_hf
    from sheared.model.loading import resolve_source

    kind, path = resolve_source(spec)
    if kind == "hf":
        return path
    source = load_source(spec)
    return save_hf(
        source.model, tmp / Path(spec).name, tokenizer=source.tokenizer, base_config=source.hf_config
    )


def evaluate(
    specs: Sequence[str],
    *,
    data_dir: str | None = None,
    tasks: Sequence[str] = (),
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    throughput: ThroughputSettings | None = None,
    batch_size: int = 8,
    max_eval_sequences: int | None = None,
) -> dict[str, Any]:
    """Evaluate every model the same way; returns {"models": {name: spec}, "domains": ..., "tasks": ..., "throughput": ...}."""
    if not specs:
        raise UserError("give at least one model to evaluate")
    if data_dir is None and not tasks and throughput is None:
        raise UserError("nothing to evaluate: give --data DIR, --tasks NAMES and/or --throughput")
    names = model_names(specs)
    results: dict[str, Any] = {"models": names}
    if data_dir is not None:
        results["domains"] = {
            n: per_domain(s, data_dir, batch_size, max_eval_sequences) for n, s in names.items()
        }
    if tasks:
        from sheared.eval.harness import run_lm_eval

        with tempfile.TemporaryDirectory() as tmp:
            results["tasks"] = {
                n: run_lm_eval(
                    _hf_dir_for(s, Path(tmp)),
                    tasks,
                    include_path=include_path,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    batch_size=batch_size,
                )
                for n, s in names.items()
            }
    if throughput is not None:
        models = {n: load_hf_model(s, torch_dtype(throughput.dtype)) for n, s in names.items()}
        vocab = min(m.config.vocab_size for m in models.values())
        results["throughput"] = {
            "settings": vars(throughput),
            "results": measure_throughput(models, throughput, vocab),
        }
    return results


def format_results(results: dict[str, Any]) -> str:
    """Readable tables of `evaluate`'s results; every column as wide as its longest name."""
    names = list(results["models"])
    lines = []
    if "domains" in results:
        lines += ["per-domain perplexity (eval split)", *_perplexity_table(results["domains"], names)]
    if "tasks" in results:
        from sheared.eval.harness import format_table

        for n in names:
            lines += ["", f"lm-eval: {n}", format_table(results["tasks"][n])]
    if "throughput" in results:
        s = results["throughput"]["settings"]
        lines += [
            "",
            f"throughput ({s['dtype']}, {s.get('threads', 1)} torch thread(s), batch {s['batch_size']}; forward "
            f"{s['seq_len']} tokens; generate {s['new_tokens']} after {s['prompt_len']}; median (min-max) of "
            f"{s['rounds']} rounds in turns; ratios to the first model per round, side by side)",
            *_throughput_table(results["throughput"]["results"]),
        ]
    return "\n".join(lines)


def _perplexity_table(domains: dict[str, dict[str, dict[str, float]]], names: list[str]) -> list[str]:
    """Perplexity per domain (rows) and model (columns), and exp of the mean loss."""
    order = list(domains[names[0]])
    rows = [[d, *(f"{domains[n][d]['perplexity']:.2f}" for n in names)] for d in order]
    mean = [math.exp(sum(v["loss"] for v in domains[n].values()) / len(order)) for n in names]
    rows.append(["exp(mean loss)", *(f"{m:.2f}" for m in mean)])
    return text_table(["domain", *names], rows, right=range(1, len(names) + 1))


def _throughput_table(tp: dict[str, dict[str, float]]) -> list[str]:
    """Forward and generation tokens/s per model (median, min-max over rounds), and their ratios to
    the first model's, taken round by round (median, min-max)."""
    first = next(iter(tp))
    header = [
        "model",
        "forward tok/s",
        "min-max",
        "generate tok/s",
        "min-max",
        f"fwd vs {first}",
        f"gen vs {first}",
    ]
    rows = []
    for n, r in tp.items():
        row = [n]
        for p, digits in (("forward", 0), ("generate", 1)):
            low, high = r.get(f"{p}_tokens_per_s_min"), r.get(f"{p}_tokens_per_s_max")
            row += [
                f"{r[p + '_tokens_per_s']:.{digits}f}",
                "" if low is None else f"{low:.{digits}f}-{high:.{digits}f}",
            ]
        for p in ("forward", "generate"):
            if f"{p}_vs_first" in r:
                row.append(
                    f"{r[p + '_vs_first']:.2f}x ({r[p + '_vs_first_min']:.2f}-{r[p + '_vs_first_max']:.2f})"
                )
            else:
                row.append(f"{r[p + '_tokens_per_s'] / tp[first][p + '_tokens_per_s']:.2f}x")
        rows.append(row)
    return text_table(header, rows, right=range(1, 7))


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, results)
