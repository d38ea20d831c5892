"""Random-weight sources for tests and smoke runs: a Hugging Face directory written when missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sheared.files import publish_dir
from sheared.model.args import ModelArgs
from sheared.model.decoder import CausalLM
from sheared.model.families import hf_config_from_args
from sheared.model.loading import load_tokenizer, save_hf


@dataclass
class SourceInit:
    """A random-weight source written to `source` when that directory does not exist yet (tests, smoke runs)."""

    family: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"
    """Family of the random model."""
    num_hidden_layers: int = 4
    """Layers."""
    hidden_size: int = 64
    """Residual width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """KV heads."""
    head_dim: int = 16
    """Head width."""
    intermediate_size: int = 128
    """MLP width."""
    tie_word_embeddings: bool = True
    """Tie input and output embeddings."""
    tokenizer: str = "smollm2-135m"
    """Source whose tokenizer (and vocabulary size) the random model uses."""
    seed: int = 0
    """Seed of the random weights."""


def ensure_source(init: SourceInit, path: str | Path) -> None:
    """Write a random-weight Hugging Face model (with the tokenizer of `init.tokenizer`) to `path` if missing."""
    out = Path(path)
    if (out / "config.json").is_file():
        return
    tokenizer = load_tokenizer(init.tokenizer)
    args = ModelArgs(
        family=init.family,
        vocab_size=len(tokenizer),
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers,
        num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads,
        head_dim=init.head_dim,
        tie_word_embeddings=init.tie_word_embeddings,
        attention_bias=init.family == "qwen2",
        qk_norm=init.family == "qwen3",
    )
    model = CausalLM(args)
    model.init_weights(torch.Generator().manual_seed(init.seed))
    base = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    with publish_dir(out) as tmp:
        save_hf(model, tmp, tokenizer=tokenizer, base_config=hf_config_from_args(args, base))
