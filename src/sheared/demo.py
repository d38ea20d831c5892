"""`make demo`: the whole pipeline on the embedded defaults, on a CPU, in minutes.

Stages (each skipped when its output is already complete, so a second `make demo` is quick):

1. the sample corpus (`data/corpus`) and its SmolLM2-tokenized, packed version (`data/prepared/...`);
2. the source: shape, parameter counts, a greedy continuation, per-domain eval loss.

Results and the resolved config go into the run directory (`runs/demo`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sheared.config import save_config
from sheared.errors import UserError
from sheared.eval.domain_loss import domain_losses
from sheared.eval.lm import greedy_generate
from sheared.model import DEFAULT_SOURCE, load_source, parameter_counts


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
    from sheared.data.corpus import build_sample_corpus
    from sheared.data.prepare import prepare_config_from_flags, prepare_data

    reports = build_sample_corpus(cfg.corpus_dir, progress=True)
    for r in reports:
        state = "cached" if r.cached else f"built from {', '.join(r.sources[:3])}"
        print(f"  {r.domain:<13} {r.documents:>7,} documents {r.characters / 1e6:6.1f} MB  {state}")
        for line in r.skipped:
            print(f"  {'':<13} skipped: {line}")
    prepare_cfg = prepare_config_from_flags(
        cfg.prepared_dir,
        [],
        cfg.corpus_dir,
        source=cfg.source,
        seq_len=cfg.seq_len,
        eval_sequences=cfg.eval_sequences,
        max_train_sequences=cfg.max_train_sequences,
        num_workers=1,
    )
    prepare_data(prepare_cfg, tokenizer=tokenizer, progress=True)


def run_demo(cfg: DemoConfig, run_dir: str | Path) -> dict:
    """Run the demo, print what happens and write `demo.json` and `config.yaml` into `run_dir`."""
    from sheared.data.tokens import PreparedData

    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    save_config(cfg, run_dir / "config.yaml")
    start = time.perf_counter()

    t0 = _stage("source")
    source = load_source(cfg.source)
    args, tok = source.args, source.tokenizer
    counts = parameter_counts(args)
    print(f"  loaded {source.path.name} ({args.family}) in {time.perf_counter() - t0:.1f} s")
    print(
        f"  shape: {args.num_hidden_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} query heads / "
        f"{args.num_key_value_heads} KV heads of {args.head_dim}, intermediate {args.intermediate_size}, "
        f"vocab {args.vocab_size}, {'tied' if args.tie_word_embeddings else 'untied'} embeddings"
    )
    print(
        f"  parameters: {counts['num_params']:,} total, {counts['num_params_embedding']:,} embedding, "
        f"{counts['num_params_non_embedding']:,} non-embedding"
    )
    model = source.model.eval()
    new_ids = greedy_generate(
        model, tok(cfg.prompt, return_tensors="pt").input_ids, cfg.max_new_tokens, tok.eos_token_id
    )
    continuation = tok.decode(new_ids[0], skip_special_tokens=True)
    print(f"  greedy: {cfg.prompt}{continuation}")

    t0 = _stage("data: sample corpus, tokenized and packed")
    prepare_demo_data(cfg, tok)
    data = PreparedData.open(cfg.prepared_dir)
    data.check_tokenizer(tok)
    print(f"  ready in {time.perf_counter() - t0:.1f} s: {', '.join(data.domains)}")

    t0 = _stage("source: per-domain eval loss (held-out sequences)")
    losses = domain_losses(model, data, batch_size=8)
    for domain, loss in losses.items():
        print(f"  {domain:<13} loss {loss:.3f}  perplexity {math.exp(loss):8.2f}")

    result = {
        "source": str(source.path),
        "shape": {
            k: getattr(args, k)
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "vocab_size",
            )
        },
        **counts,
        "prompt": cfg.prompt,
        "continuation": continuation,
        "source_eval_loss": losses,
        "seconds": time.perf_counter() - start,
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {run_dir / 'demo.json'} ({result['seconds']:.0f} s in all)")
    return result
