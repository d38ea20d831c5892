"""Tokenizer -> GGUF vocabulary: tokens, token types, merges, special ids, llama.cpp's pre-tokenizer
name and the chat template (`tokenizer.ggml.*`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import gguf

from sheared.errors import UserError

# A tokenizer.json pre-tokenizer, reduced by `_pre_tokenizer_signature`, -> llama.cpp's name for the
# same text splitting (`tokenizer.ggml.pre`). llama.cpp splits text before byte-level BPE with
# built-in regexes chosen by that name; without one it falls back to its `default` splitting.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM/SmolLM2: single digits, then GPT-2's
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3.x
}


@dataclasses.dataclass
class GGUFVocab:
    """A byte-level BPE vocabulary in GGUF terms (`tokenizer.ggml.*`)."""

    tokens: list[str]
    """Token text per id (byte-level alphabet, e.g. `Ġthe`), padded to the model's vocab size."""
    token_types: list[int]
    """`gguf.TokenType` per id: NORMAL, CONTROL (special added), USER_DEFINED (other added), UNUSED (padding)."""
    merges: list[str]
    """BPE merges in priority order, `left right`."""
    pre: str | None
    """llama.cpp's pre-tokenizer name, or None when the tokenizer's splitting has no llama.cpp name."""
    add_bos: bool
    """Whether the tokenizer puts BOS in front of every text."""
    add_eos: bool
    """Whether the tokenizer puts EOS after every text."""


def _parts(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return (
        list(spec.get("pretokenizers") or spec.get("decoders") or [])
        if spec["type"] == "Sequence"
        else [spec]
    )


def _pre_tokenizer_signature(spec: dict) -> tuple:
    """The parts of a tokenizer.json pre-tokenizer that decide how text is split, as a hashable tuple."""
    signature: list[tuple] = [("normalizer", spec["normalizer"]["type"])] if spec.get("normalizer") else []
    for part in _parts(spec.get("pre_tokenizer")):
        kind = part["type"]
        if kind == "ByteLevel" and part.get("add_prefix_space"):
            signature.append(("ByteLevel", part.get("use_regex", True), "add_prefix_space"))
        elif kind == "ByteLevel":
            signature.append(("ByteLevel", part.get("use_regex", True)))
        elif kind == "Digits":
            signature.append(("Digits", bool(part.get("individual_digits"))))
        elif kind == "Split":
            pattern = part["pattern"]
            signature.append(("Split", pattern.get("Regex", pattern.get("String"))))
        else:
            signature.append((kind,))
    return tuple(signature)


def gguf_vocab(tokenizer: Any, vocab_size: int, bos_id: int | None, eos_id: int | None) -> GGUFVocab:
    """The GGUF vocabulary of a byte-level BPE tokenizer (SmolLM/SmolLM2, Llama 3, GPT-2 style).

    Ids the tokenizer does not use (an embedding padded beyond the vocabulary) become `[PAD<id>]`
    tokens of type UNUSED, so every embedding row has a token.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    kinds = {p["type"] for p in _parts(spec.get("pre_tokenizer")) + _parts(spec.get("decoder"))}
    if model["type"] != "BPE" or "ByteLevel" not in kinds:
        raise UserError(
            f"GGUF export supports byte-level BPE tokenizers (SmolLM/SmolLM2, Llama 3); this one is a "
            f"{model['type']} model with {', '.join(sorted(kinds)) or 'no'} pre-tokenizer/decoder parts"
        )
    text_of = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    text_of.update({i: t["content"] for i, t in added.items()})
    if max(text_of) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(text_of)} but the model only {vocab_size} embeddings"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in text_of:
            tokens.append(text_of[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        pre=PRE_TOKENIZERS.get(_pre_tokenizer_signature(spec)),
        add_bos=bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id],
        add_eos=eos_id is not None and with_special[-1:] == [eos_id] and plain[-1:] != [eos_id],
    )


def _first_id(value: Any) -> int | None:
    """A token id from a config entry that may be a list (e.g. Llama 3.1's several EOS ids)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def special_token_ids(config: Any, tokenizer: Any) -> dict[str, int | None]:
    """BOS/EOS/padding/unknown ids: the model config's, else the tokenizer's."""
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        value = _first_id(getattr(config, f"{key}_token_id", None))
        ids[key] = value if value is not None else _first_id(getattr(tokenizer, f"{key}_token_id", None))
    return ids


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab, ids: dict[str, int | None], template: Any) -> None:
    """The `tokenizer.ggml.*` keys: the vocabulary, merges, token types, special ids and chat template."""
    writer.add_tokenizer_model("gpt2")
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, value in ids.items():
        if value is not None:
            setters[key](value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
