"""Making what a run needs when it is missing: a random-weight source, prepared data; and
reading reference losses as the user gave them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sheared.errors import UserError
from sheared.train.config import DataConfig, SourceInit


def ensure_source(init: SourceInit, path: str) -> None:
    """Write a random-weight Hugging Face model (with the tokenizer of `init.tokenizer`) to `path` if missing."""
    from sheared.model import CausalLM, ModelArgs, hf_config_from_args, load_tokenizer, save_hf

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
    tmp = out.with_name(out.name + ".tmp")
    save_hf(model, tmp, tokenizer=tokenizer, base_config=hf_config_from_args(args, base))
    tmp.rename(out)


def ensure_prepared(cfg: DataConfig, tokenizer: Any, source_spec: str) -> None:
    """Build the corpus and prepare it into `cfg.path` when that holds no prepared data and
    `cfg.auto_prepare` says how; otherwise leave it to `PreparedData.open` to complain."""
    from sheared.data.tokens import METADATA_FILE

    if (Path(cfg.path) / METADATA_FILE).is_file() or cfg.auto_prepare is None:
        return
    from sheared.data.prepare import prepare_config_from_flags, prepare_data

    auto = cfg.auto_prepare
    if auto.corpus == "tiny":
        from sheared.data.tiny_corpus import build_tiny_corpus

        build_tiny_corpus(auto.corpus_dir)
    else:
        from sheared.data.corpus import build_sample_corpus

        build_sample_corpus(auto.corpus_dir, progress=True)
    prepare_cfg = prepare_config_from_flags(
        cfg.path,
        [],
        auto.corpus_dir,
        source=source_spec,
        seq_len=auto.seq_len,
        eval_sequences=auto.eval_sequences,
        max_train_sequences=auto.max_train_sequences,
        num_workers=auto.num_workers,
    )
    prepare_data(prepare_cfg, tokenizer=tokenizer, progress=True)


def read_reference_losses(
    spec: str | dict[str, float], domains: list[str], previous: dict[str, Any]
) -> dict[str, float] | None:
    """Reference losses per domain, or None when they must be measured on the source (`source`).

    `source` while continuing a pruned model means the pruning run's reference (the original
    source's losses), which the export keeps next to the model.
    """
    if isinstance(spec, dict):
        values = spec
        where = "data.reference_losses"
    elif spec == "source":
        if previous.get("reference_losses") and set(previous["reference_losses"]) >= set(domains):
            return {d: float(previous["reference_losses"][d]) for d in domains}
        return None
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"data.reference_losses {spec!r} is neither 'source' nor an existing JSON file")
        loaded = json.loads(path.read_text())
        values = loaded.get("reference_losses", loaded)
        where = str(path)
    unknown = [d for d in values if d not in domains]
    missing = [d for d in domains if d not in values]
    if unknown or missing:
        problem = f"unknown domain {unknown[0]!r}" if unknown else f"no value for domain {missing[0]!r}"
        raise UserError(f"reference losses in {where}: {problem}; the data has: {', '.join(domains)}")
    return {d: float(values[d]) for d in domains}
