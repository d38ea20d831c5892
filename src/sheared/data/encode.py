"""Documents to token ids: the document convention (`[BOS] text EOS`) and the tokenizer workers.

`document_convention` decides, per tokenizer family, whether BOS is prepended and which token ends a
document; `encode_documents` applies it to a batch of texts. `document_encoder` opens an `Encoder`
that tokenizes chunks of documents on `num_workers` processes (or in this process when 1) and
returns them in order, so the output is the same for 1 and N workers.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sheared.errors import UserError

# Pretraining document separators of SmolLM/Qwen (<|endoftext|>) and Llama-3 (<|end_of_text|>); they
# come before the tokenizer's eos_token, which for chat models is the end-of-turn token.
DOCUMENT_END_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>")
BOS_PROBE_TEXT = "a"  # a text the tokenizer encodes without special tokens of its own
CHUNK_CHARS = 1 << 20  # documents are sent to workers in chunks of about this many characters
CHUNK_DOCUMENTS = 512  # ... and at most this many documents
CHUNKS_IN_FLIGHT_PER_WORKER = (
    2  # queued ahead per worker: keeps workers busy, lets a capped domain stop early
)
START_METHOD = "spawn"  # workers load the tokenizer from disk; nothing is inherited from the parent
TOKEN_ID_DTYPE = np.uint32  # ids on their way from the tokenizer (any vocabulary fits)
LENGTH_DTYPE = np.int64


# --------------------------------------------------------------------------------------------------
# Document convention and tokenization (pure functions of a tokenizer).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentConvention:
    """How a document becomes tokens: `[BOS] tokens(text) EOS`."""

    add_special_tokens: bool
    """Tokenize with the tokenizer's default special tokens (true when that default adds BOS)."""
    bos_token_id: int | None
    """The BOS id the tokenizer prepends itself, or None when it prepends nothing."""
    eos_token_id: int
    """The document-end id appended after every document."""


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` when the vocabulary has it as one token, else None."""
    return tokenizer.get_vocab().get(token)


def document_convention(tokenizer: Any, document_end_token: str | None = None) -> DocumentConvention:
    """The family's document convention for a tokenizer.

    BOS is prepended iff the tokenizer adds it by default (Llama-3 does, SmolLM2 and Qwen do not).
    The document end is `document_end_token` when given, else the first of `DOCUMENT_END_TOKENS`
    the vocabulary holds as a single token, else the tokenizer's eos_token.

    Raises:
        UserError: If `document_end_token` is not a single token of the vocabulary, or no
            document-end token can be found.
    """
    bos = tokenizer.bos_token_id
    probe = tokenizer(BOS_PROBE_TEXT)["input_ids"]
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    if document_end_token is not None:
        eos = _single_token_id(tokenizer, document_end_token)
        if eos is None:
            raise UserError(
                f"document_end_token {document_end_token!r} is not a single token of the tokenizer's vocabulary "
                f"(its special tokens: {', '.join(tokenizer.all_special_tokens)})"
            )
    else:
        found = [_single_token_id(tokenizer, t) for t in DOCUMENT_END_TOKENS]
        eos = next((i for i in found if i is not None), tokenizer.eos_token_id)
        if eos is None:
            raise UserError(
                f"tokenizer {tokenizer.name_or_path} has no document-end token (none of "
                f"{', '.join(DOCUMENT_END_TOKENS)} and no eos_token); set document_end_token"
            )
    return DocumentConvention(
        add_special_tokens=adds_bos, bos_token_id=bos if adds_bos else None, eos_token_id=eos
    )


def encode_documents(
    tokenizer: Any, texts: Sequence[str], convention: DocumentConvention
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents as `[BOS] text EOS` each.

    Special-token strings inside a text (say a literal "<|endoftext|>" in a web page) are tokenized as
    plain text, so only the appended EOS ever marks a document end.

    Args:
        tokenizer: A fast `transformers` tokenizer.
        texts: (n,) documents.
        convention: BOS/EOS handling (see `document_convention`).

    Returns:
        tokens: (sum of lengths,) uint32, the documents' ids one after another.
        lengths: (n,) int64, tokens per document (EOS included).
    """
    if not texts:
        return np.zeros(0, dtype=TOKEN_ID_DTYPE), np.zeros(0, dtype=LENGTH_DTYPE)
    encoded = tokenizer(
        list(texts),
        add_special_tokens=convention.add_special_tokens,
        split_special_tokens=True,  # "<|endoftext|>" written inside a document is text, not a boundary
        return_attention_mask=False,
        verbose=False,  # documents are longer than model_max_length by design
    )["input_ids"]
    eos = [convention.eos_token_id]
    ids = [token for document in encoded for token in (*document, *eos)]
    lengths = np.fromiter((len(document) + 1 for document in encoded), dtype=LENGTH_DTYPE, count=len(encoded))
    return np.asarray(ids, dtype=TOKEN_ID_DTYPE), lengths


# --------------------------------------------------------------------------------------------------
# Tokenizer workers: chunks of documents in, (tokens, lengths) out, in order.
# --------------------------------------------------------------------------------------------------


# Each tokenizer process loads the tokenizer once (in its initializer) and keeps it here; the parent
# process never calls this, so the cache is empty there.
@functools.lru_cache(maxsize=1)
def _worker_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _init_worker(directory: str, rayon_threads: int) -> None:
    # Share the cores between workers instead of every worker's Rust thread pool taking all of them.
    os.environ.setdefault("RAYON_NUM_THREADS", str(rayon_threads))
    # An initializer that raises makes the pool start replacement workers forever; if loading fails
    # here, the first task loads the tokenizer again and its error reaches the parent instead.
    with contextlib.suppress(Exception):
        _worker_tokenizer(directory)


def _encode_in_worker(task: tuple[str, list[str], DocumentConvention]) -> tuple[np.ndarray, np.ndarray]:
    directory, texts, convention = task
    return encode_documents(_worker_tokenizer(directory), texts, convention)


def _chunks(texts: Sequence[str]) -> Iterator[list[str]]:
    """Consecutive runs of texts of about `CHUNK_CHARS` characters (at most `CHUNK_DOCUMENTS`)."""
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _ordered_map(pool: Any, fn: Callable, tasks: Iterable[Any], in_flight: int) -> Iterator[Any]:
    """`pool.imap(fn, tasks)` with at most `in_flight` tasks queued, so the consumer can stop early."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# An encoder maps chunks of texts to (tokens, lengths) per chunk, in order.
Encoder = Callable[[Iterable[list[str]]], Iterator[tuple[np.ndarray, np.ndarray]]]


def _in_process_encoder(tokenizer: Any, convention: DocumentConvention) -> Encoder:
    def encode(chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in chunks:
            yield encode_documents(tokenizer, chunk, convention)

    return encode


def _pool_encoder(pool: Any, tokenizer_dir: str, convention: DocumentConvention, num_workers: int) -> Encoder:
    def encode(chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        tasks = ((tokenizer_dir, chunk, convention) for chunk in chunks)
        yield from _ordered_map(pool, _encode_in_worker, tasks, num_workers * CHUNKS_IN_FLIGHT_PER_WORKER)

    return encode


def document_tokens(texts: Sequence[str], encoder: Encoder) -> Iterator[np.ndarray]:
    """(length,) uint32 token ids of each document, in order."""
    for tokens, lengths in encoder(_chunks(texts)):
        yield from np.split(tokens, np.cumsum(lengths)[:-1])


@contextlib.contextmanager
def document_encoder(
    tokenizer: Any, tokenizer_dir: str, convention: DocumentConvention, num_workers: int
) -> Iterator[Encoder]:
    """An `Encoder` on `num_workers` processes, or in this process when `num_workers` is 1.

    With `num_workers > 1` the processes are started with "spawn" and each loads the tokenizer saved
    in `tokenizer_dir`; they are terminated when the block ends.

    Args:
        tokenizer: A fast `transformers` tokenizer (used in this process when `num_workers` is 1).
        tokenizer_dir: Where `tokenizer` is saved with `save_pretrained` (what the workers load).
        convention: BOS/EOS handling (see `document_convention`).
        num_workers: Tokenizer processes.
    """
    if num_workers <= 1:
        yield _in_process_encoder(tokenizer, convention)
        return
    pool = None
    try:
        rayon_threads = max(1, (os.cpu_count() or 1) // num_workers)
        context = multiprocessing.get_context(START_METHOD)
        pool = context.Pool(num_workers, _init_worker, (str(tokenizer_dir), rayon_threads))
        yield _pool_encoder(pool, str(tokenizer_dir), convention, num_workers)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
