"""Throughput of several models under the same settings: forward tokens/s and generation tokens/s.

Models are measured as plain `transformers` models (what users deploy), side by side in one
process: every round measures each model's forward pass and generation once, the models
alternating (A fwd, B fwd, B gen, A gen; then B fwd, A fwd, A gen, B gen), so a machine that
slows down or speeds up hits all of them alike. Medians over rounds are reported with their
min and max, and each model's speed relative to the first model is taken per round (paired),
which cancels machine-wide slowdowns best.

The measurement runs with a stated number of torch threads, one by default: on a 2-core
machine shared with a CPU-heavy process, two threads made every parallel op wait for a
descheduled thread, and the pruned/source ratio came out anywhere from 1.4x to 32x instead
of 1.8x (docs/benchmarks.md, "Throughput on a shared machine").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sheared.errors import UserError

PASSES = ("forward", "generate")
WARMUP_NEW_TOKENS = 2  # the warm-up runs the prompt pass and one cached step: first-call costs, not speed


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
    """Measured rounds (after a short warm-up); each measures every model's forward and generation once."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16."""
    threads: int = 1
    """torch intra-op threads during the measurement (torch's own setting is restored after). One
    thread keeps the ratio steady when another process takes a core; more threads measure a
    machine that is otherwise idle."""

    def __post_init__(self) -> None:
        values = (self.batch_size, self.seq_len, self.prompt_len, self.new_tokens, self.rounds, self.threads)
        if min(values) < 1:
            raise UserError(f"throughput settings must all be positive, got {self}")
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


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads, then restore torch's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def round_order(names: Sequence[str], round_index: int) -> list[tuple[str, str]]:
    """(model, pass) in the order one round measures them: the forward passes in an order that
    rotates every round, the generations in its reverse, so the two models of a pair are
    measured next to each other and each goes first as often as last."""
    k = round_index % len(names)
    order = list(names[k:]) + list(names[:k])
    return [(n, "forward") for n in order] + [(n, "generate") for n in reversed(order)]


def _generate(model, prompt: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> None:
    model.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(
    seconds: Mapping[str, Mapping[str, Sequence[float]]], tokens: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Medians, mins and maxes of per-round timings, and each model's speed relative to the first
    model's in the same round.

    Args:
        seconds: name -> pass ("forward", "generate") -> seconds per round, in round order.
        tokens: pass -> tokens each call of that pass processes or generates.

    Returns:
        name -> for each pass P: "P_s" (median seconds), "P_tokens_per_s" (tokens / median seconds),
        "P_tokens_per_s_min", "P_tokens_per_s_max" (slowest and fastest round), and "P_vs_first",
        "P_vs_first_min", "P_vs_first_max" (median, min, max over rounds of this model's tokens/s
        divided by the first model's in the same round; 1.0 for the first model).
    """
    first = next(iter(seconds))
    out: dict[str, dict[str, float]] = {}
    for name, passes in seconds.items():
        row = {}
        for p in PASSES:
            times = passes[p]
            paired = [base / t for base, t in zip(seconds[first][p], times, strict=True)]
            row[f"{p}_s"] = statistics.median(times)
            row[f"{p}_tokens_per_s"] = tokens[p] / row[f"{p}_s"]
            row[f"{p}_tokens_per_s_min"] = tokens[p] / max(times)
            row[f"{p}_tokens_per_s_max"] = tokens[p] / min(times)
            row[f"{p}_vs_first"], row[f"{p}_vs_first_min"], row[f"{p}_vs_first_max"] = _spread(paired)
        out[name] = row
    return out


@torch.no_grad()
def measure_throughput(
    models: Mapping[str, torch.nn.Module], settings: ThroughputSettings, vocab_size: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Forward and generation tokens/s of each model, measured side by side in alternating turns.

    Runs with `settings.threads` torch threads and restores torch's setting after. The warm-up
    gives every model one forward pass and a generation of `WARMUP_NEW_TOKENS` tokens; then each
    of `settings.rounds` rounds measures every model's forward pass and generation once, in the
    order of `round_order`.

    Args:
        models: name -> a `transformers` causal LM (eval mode, on `device`); the first is the
            one the others are compared with.
        settings: batch, lengths, rounds, dtype, threads.
        vocab_size: token ids are drawn below this (the models must share a tokenizer).
        device: where the inputs go.

    Returns:
        name -> the keys of `summarize`: "forward_tokens_per_s", "generate_tokens_per_s",
        "forward_s", "generate_s" (medians), their "_min"/"_max" in tokens/s, and the paired
        "forward_vs_first"/"generate_vs_first" with their "_min"/"_max".
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len), generator=g).to(device)
    prompt = ids[:, : settings.prompt_len]  # (B, prompt_len)
    mask = torch.ones_like(prompt)
    names = list(models)
    calls = {
        "forward": lambda m: m(ids),
        "generate": lambda m: _generate(m, prompt, mask, settings.new_tokens),
    }
    seconds = {n: {p: [] for p in PASSES} for n in names}
    with torch_threads(settings.threads):
        for model in models.values():
            model(ids)
            _generate(model, prompt, mask, min(WARMUP_NEW_TOKENS, settings.new_tokens))
        for r in range(settings.rounds):
            for name, p in round_order(names, r):
                seconds[name][p].append(_timed(calls[p], models[name]))
    tokens = {
        "forward": settings.batch_size * settings.seq_len,
        "generate": settings.batch_size * settings.new_tokens,
    }
    return summarize(seconds, tokens)
