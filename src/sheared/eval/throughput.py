"""Throughput of several models under the same settings: forward tokens/s and generation tokens/s.

Models are measured as plain `transformers` models (what users deploy), in turns: every round
runs each model once, in a rotating order, so a noisy machine slows all of them alike; the
medians over rounds are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sheared.errors import UserError


@dataclass
class ThroughputSettings:
    """What every model is measured on."""

    batch_size: int = 4
    """Sequences per forward pass and per generate call."""
    seq_len: int = 256
    """Tokens per sequence in the forward measurement."""
    prompt_len: int = 32
    """Prompt tokens for generation."""
    new_tokens: int = 32
    """Tokens generated per sequence (exactly: min = max)."""
    rounds: int = 3
    """Measured rounds (after one warm-up round)."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16."""

    def __post_init__(self) -> None:
        if min(self.batch_size, self.seq_len, self.prompt_len, self.new_tokens, self.rounds) < 1:
            raise UserError("throughput settings must all be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


def load_hf_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A `transformers` causal LM for any source spec (HF directory as is; GGUF or embedded name
    rebuilt as a plain model with the same weights)."""
    from transformers import AutoModelForCausalLM

    from sheared.model import load_source
    from sheared.model.loading import resolve_source

    kind, path = resolve_source(spec)
    if kind == "hf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    source = load_source(spec, with_tokenizer=False)
    from sheared.model.families import hf_config_from_args

    config = hf_config_from_args(source.args, source.hf_config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = source.model.state_dict()
    if source.args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def measure_throughput(
    models: Mapping[str, torch.nn.Module], settings: ThroughputSettings, vocab_size: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Forward and generation tokens/s of each model, measured in rotating turns.

    Args:
        models: name -> a `transformers` causal LM (eval mode, on `device`).
        settings: batch, lengths, rounds, dtype.
        vocab_size: token ids are drawn below this (the models must share a tokenizer).
        device: where the inputs go.

    Returns:
        name -> {"forward_tokens_per_s", "generate_tokens_per_s", "forward_s", "generate_s"} (medians).
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len), generator=g).to(device)
    prompt = ids[:, : settings.prompt_len]
    mask = torch.ones_like(prompt)
    names = list(models)
    times = {n: {"forward": [], "generate": []} for n in names}
    for r in range(settings.rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model = models[name]
            t_fwd = _timed(lambda m=model: m(ids))
            t_gen = _timed(
                lambda m=model: m.generate(
                    prompt,
                    attention_mask=mask,
                    max_new_tokens=settings.new_tokens,
                    min_new_tokens=settings.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            )
            if r > 0:  # round 0 warms up every model
                times[name]["forward"].append(t_fwd)
                times[name]["generate"].append(t_gen)
    out = {}
    for name in names:
        fwd, gen = statistics.median(times[name]["forward"]), statistics.median(times[name]["generate"])
        out[name] = {
            "forward_tokens_per_s": settings.batch_size * settings.seq_len / fwd,
            "generate_tokens_per_s": settings.batch_size * settings.new_tokens / gen,
            "forward_s": fwd,
            "generate_s": gen,
        }
    return out
