"""Tokenize and pack: documents of several domains → fixed-length token sequences on disk.

    cfg = PrepareConfig(out_dir="data/prepared", domains={"code": DomainInput(["corpus/code.jsonl"])})
    metadata = prepare_data(cfg)

Per domain, top to bottom:

1. read every document (`readers.iter_documents`), dropping empty ones and those under `min_chars`;
2. shuffle the document order with a generator seeded by (`seed`, crc32 of the domain name);
3. tokenize in that order on `num_workers` processes (`sheared.data.encode`), each document followed
   by the document-end token (and preceded by BOS when the tokenizer adds one itself, as Llama-3's does);
4. split **by document**: documents go to eval until the eval stream holds `eval_sequences * seq_len`
   tokens, the rest go to train, so no document is in both;
5. pack each split: concatenate, cut into `seq_len` rows, drop the incomplete tail.

`ensure_prepared` does all of this (and builds the corpus first) when a run's data folder is
missing and its `AutoPrepare` says how.

Token files are written atomically and metadata.json is rewritten after each finished domain, so an
interrupted run leaves finished domains intact; running it again skips them and redoes the rest.
The output is the same for 1 and N workers (chunks are tokenized in order).
"""

from __future__ import annotations

import contextlib
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from sheared.config import config_from_dict
from sheared.data.encode import (
    TOKEN_ID_DTYPE,
    DocumentConvention,
    Encoder,
    document_convention,
    document_encoder,
    document_tokens,
)
from sheared.data.readers import check_format, expand_paths, iter_documents
from sheared.data.tokens import (
    FORMAT_VERSION,
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    VAL_SPLIT,
    TokenFileWriter,
    dtype_name,
    read_metadata,
    token_dtype,
    token_file_name,
    token_file_problem,
    tokenizer_fingerprint,
    write_metadata,
)
from sheared.errors import UserError
from sheared.files import guard_writes, publish_dir

DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
CORPUS_GLOB = "*.jsonl"  # the sample corpus: one `<domain>.jsonl` per domain


# --------------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------------


@dataclass
class DomainInput:
    """Where one domain's documents are and how to read them."""

    paths: list[str]
    """Files, directories (every file below them) or glob patterns."""
    format: Literal["auto", "jsonl", "parquet", "text", "hf_dataset"] = "auto"
    """How to read them; "auto" picks per file by its name (.jsonl[.gz|.zst], .parquet) or content."""
    text_field: str = "text"
    """The JSONL field, Parquet column or dataset column that holds the text."""

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise UserError("a domain needs at least one input path (a file, directory or glob pattern)")
        check_format(self.format)
        if not self.text_field:
            raise UserError("text_field must name the field that holds the text, got ''")


@dataclass
class PrepareConfig:
    """What `sheared data prepare` does: which domains, which tokenizer, how long the sequences are."""

    out_dir: str
    """The prepared directory: metadata.json, `<domain>.<split>.bin`, tokenizer/."""
    domains: dict[str, DomainInput]
    """Domain name ([A-Za-z0-9_.-]+) -> its inputs, in the order they are prepared."""
    source: str = "smollm2-135m"
    """The model whose tokenizer is used: an embedded name, a HF directory or a .gguf file."""
    seq_len: int = 1024
    """Tokens per packed sequence."""
    eval_sequences: int = 64
    """Held-out sequences per domain (whole documents are held out, never parts shared with train).
    Results report this split; no decision of a run reads it."""
    val_sequences: int | None = None
    """Validation sequences per domain, also of whole documents of their own: the split dynamic batch
    loading reweights on (None: as many as `eval_sequences`; 0: none, DBL then reads the eval split)."""
    max_train_sequences: int | None = None
    """Cap on train sequences per domain; None packs every document."""
    min_chars: int = 0
    """Drop documents shorter than this many characters (empty documents are always dropped)."""
    seed: int = 0
    """Seeds the document shuffle (together with the domain name)."""
    num_workers: int = 2
    """Tokenizer processes; 1 tokenizes in this process."""
    document_end_token: str | None = None
    """Token appended after every document; None uses <|endoftext|> or <|end_of_text|> if the
    vocabulary has one, else the tokenizer's eos_token."""

    def __post_init__(self):
        if not str(self.out_dir):
            raise UserError("out_dir must name a directory, got ''")
        self.out_dir = str(self.out_dir)
        if not self.domains:
            raise UserError("no domains given; give at least one domain NAME with its input paths")
        self.domains = {name: _domain_input(name, spec) for name, spec in self.domains.items()}
        for name in self.domains:
            if not DOMAIN_NAME.fullmatch(name):
                raise UserError(f"domain name {name!r} may only use letters, digits, '_', '.' and '-'")
        if self.val_sequences is None:
            self.val_sequences = self.eval_sequences
        minimums = {
            "seq_len": 2,
            "eval_sequences": 1,
            "val_sequences": 0,
            "num_workers": 1,
            "min_chars": 0,
            "seed": 0,
        }
        for key, minimum in minimums.items():
            if getattr(self, key) < minimum:
                raise UserError(f"{key} must be at least {minimum}, got {getattr(self, key)}")
        if self.max_train_sequences is not None and self.max_train_sequences < 1:
            raise UserError(
                f"max_train_sequences must be at least 1 (or None for all), got {self.max_train_sequences}"
            )
        if self.document_end_token == "":
            raise UserError("document_end_token must be a token of the vocabulary (or None), got ''")


def _domain_input(name: str, spec: DomainInput | Mapping[str, Any] | Sequence[str] | str) -> DomainInput:
    """A `DomainInput` from itself, a mapping of its fields, or just its paths."""
    if isinstance(spec, DomainInput):
        return spec
    if isinstance(spec, Mapping):
        return config_from_dict(DomainInput, spec, f"domains.{name}")
    return DomainInput(paths=[spec] if isinstance(spec, str) else list(spec))


def prepare_config_from_flags(
    out_dir: str, domains: Sequence[str], corpus_dir: str | None, **overrides: Any
) -> PrepareConfig:
    """A `PrepareConfig` from command-line values.

    Args:
        out_dir: The prepared directory.
        domains: `NAME=PATH[,PATH...]` items (paths may be files, directories or globs).
        corpus_dir: A sample corpus folder: every `*.jsonl` in it is a domain named after the file.
        **overrides: Other `PrepareConfig` fields (seq_len=256, ...); None values are left at
            their defaults, so unset flags can be passed through.

    Raises:
        UserError: On a malformed `NAME=PATH` item, a domain named twice, a corpus folder without
            JSONL files, no domains at all, or an invalid value.
    """
    named: dict[str, dict[str, Any]] = {}
    if corpus_dir is not None:
        folder = Path(corpus_dir)
        if not folder.is_dir():
            raise UserError(f"corpus directory {corpus_dir!r} does not exist")
        files = sorted(folder.glob(CORPUS_GLOB))
        if not files:
            raise UserError(f"corpus directory {corpus_dir!r} has no {CORPUS_GLOB} files (one per domain)")
        named.update({f.name.removesuffix(".jsonl"): {"paths": [str(f)]} for f in files})
    for item in domains:
        name, sep, raw_paths = item.partition("=")
        paths = [p.strip() for p in raw_paths.split(",") if p.strip()]
        if not sep or not name.strip() or not paths:
            raise UserError(f"domain {item!r} is not of the form NAME=PATH[,PATH...]")
        if name.strip() in named:
            raise UserError(f"domain {name.strip()!r} is given twice; give each domain once")
        named[name.strip()] = {"paths": paths}
    if not named:
        raise UserError("no domains given; pass NAME=PATH[,PATH...] items or a corpus directory")
    values = {key: value for key, value in overrides.items() if value is not None}
    return config_from_dict(PrepareConfig, {"out_dir": out_dir, "domains": named, **values})


# --------------------------------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------------------------------


class _Packer:
    """Cuts a stream of documents' tokens into full `seq_len` rows and writes them to a token file."""

    def __init__(self, writer: TokenFileWriter, seq_len: int, max_sequences: int | None):
        self.writer = writer
        self.seq_len = seq_len
        self.max_sequences = max_sequences
        self.sequences = 0
        self.documents = 0
        self.tokens_seen = 0  # all tokens of the documents added, written or not
        self._tail = np.zeros(0, dtype=TOKEN_ID_DTYPE)  # < seq_len tokens waiting for the next document

    @property
    def full(self) -> bool:
        return self.max_sequences is not None and self.sequences >= self.max_sequences

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens ((n,) uint32); whole rows are written, the rest waits."""
        assert not self.full
        self.documents += 1
        self.tokens_seen += len(tokens)
        stream = np.concatenate([self._tail, tokens])
        rows = len(stream) // self.seq_len
        if self.max_sequences is not None:
            rows = min(rows, self.max_sequences - self.sequences)
        self.writer.write(stream[: rows * self.seq_len])
        self.sequences += rows
        self._tail = stream[rows * self.seq_len :]


def _shuffled(items: Sequence[str], seed: int, domain: str) -> list[str]:
    """`items` in an order that depends only on `seed` and the domain name."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    return [items[i] for i in rng.permutation(len(items))]


def _read_domain(name: str, spec: DomainInput, min_chars: int) -> list[str]:
    """The domain's document texts, in reading order, without empty or too-short ones."""
    shortest = max(min_chars, 1)
    texts = [
        text for text, _ in iter_documents(spec.paths, spec.format, spec.text_field) if len(text) >= shortest
    ]
    if not texts:
        limit = f" with at least {min_chars} characters" if min_chars > 0 else ""
        raise UserError(f"domain {name!r} has no documents{limit} in {', '.join(spec.paths)}")
    return texts


def _domain_options(cfg: PrepareConfig, spec: DomainInput) -> dict[str, Any]:
    """Settings that decide a domain's files besides the global ones (compared on re-runs)."""
    return {
        "format": spec.format,
        "text_field": spec.text_field,
        "min_chars": cfg.min_chars,
        "eval_sequences": cfg.eval_sequences,
        "val_sequences": cfg.val_sequences,
        "max_train_sequences": cfg.max_train_sequences,
    }


def _prepare_domain(
    name: str, cfg: PrepareConfig, out: Path, vocab_size: int, encoder: Encoder, progress: bool
) -> dict[str, Any]:
    """Tokenize, split and pack one domain into its token files (train, eval and val); returns its
    metadata entry."""
    texts = _shuffled(_read_domain(name, cfg.domains[name], cfg.min_chars), cfg.seed, name)
    splits = [*SPLITS, VAL_SPLIT] if cfg.val_sequences else list(SPLITS)
    paths = {split: out / token_file_name(name, split) for split in splits}
    started, dtype = time.perf_counter(), token_dtype(vocab_size)
    files = f"the token files of domain {name!r} in {out}"
    bound = lambda: _token_bytes_bound(texts, cfg, dtype)  # noqa: E731 (worked out only on a full disk)
    with guard_writes(out, needed=bound, what=files, up_to=True):
        return _pack_domain(name, cfg, texts, paths, vocab_size, encoder, progress, started)


def _token_bytes_bound(texts: list[str], cfg: PrepareConfig, dtype: np.dtype) -> int:
    """At most how many bytes a domain's token files take: a token covers at least one UTF-8 byte of its
    document, plus BOS and document end; fewer when `max_train_sequences` caps the train split."""
    tokens = sum(len(t.encode("utf-8")) + 2 for t in texts)
    if cfg.max_train_sequences is not None:
        tokens = min(tokens, (cfg.max_train_sequences + cfg.eval_sequences + cfg.val_sequences) * cfg.seq_len)
    return tokens * dtype.itemsize


def _pack_domain(
    name: str,
    cfg: PrepareConfig,
    texts: list[str],
    paths: dict[str, Path],
    vocab_size: int,
    encoder: Encoder,
    progress: bool,
    started: float,
) -> dict[str, Any]:
    """Split and pack one domain's documents (in their shuffled order) into its token files, each id
    checked against the vocabulary."""
    spec, dtype = cfg.domains[name], token_dtype(vocab_size)
    held_out = {"eval": cfg.eval_sequences, VAL_SPLIT: cfg.val_sequences}
    splits = list(paths)
    with contextlib.ExitStack() as stack:
        writers = {
            split: stack.enter_context(TokenFileWriter(paths[split], dtype, vocab_size)) for split in splits
        }
        bar = stack.enter_context(tqdm(total=len(texts), desc=name, unit="doc", disable=not progress))
        packers = {
            split: _Packer(writers[split], cfg.seq_len, held_out.get(split, cfg.max_train_sequences))
            for split in splits
        }
        # Whole documents fill eval, then val, then train: no document is split between two of them.
        order = [s for s in ("eval", VAL_SPLIT) if s in packers] + ["train"]
        for tokens in document_tokens(texts, encoder):
            packers[next(s for s in order if not packers[s].full)].add(tokens)
            bar.update(1)
            if packers["train"].full:
                break
        short = [s for s in order[:-1] if not packers[s].full]
        if short or packers["train"].sequences == 0:
            seen = sum(p.tokens_seen for p in packers.values())
            needed = sum(held_out[s] for s in order[:-1]) * cfg.seq_len
            raise UserError(
                f"domain {name!r} is too small: its {len(texts)} documents have {seen} tokens, but "
                f"{cfg.eval_sequences} eval and {cfg.val_sequences} validation sequences need {needed} tokens "
                f"plus {cfg.seq_len} for one train sequence (seq_len {cfg.seq_len}); lower eval_sequences, "
                "val_sequences or seq_len, or add documents"
            )
        checksums = {split: writers[split].commit() for split in splits}
    elapsed = time.perf_counter() - started
    total = sum(p.tokens_seen for p in packers.values())
    val = f" + {packers[VAL_SPLIT].sequences} val" if VAL_SPLIT in packers else ""
    print(
        f"{name}: {packers['train'].sequences} train + {packers['eval'].sequences} eval{val} sequences of "
        f"{cfg.seq_len} tokens from {sum(p.documents for p in packers.values())} documents "
        f"({total / max(elapsed, 1e-9):,.0f} tokens/s)"
    )
    return {
        "sources": list(spec.paths),
        "options": _domain_options(cfg, spec),
        "documents": {split: packers[split].documents for split in splits},
        "splits": {
            split: {
                "file": paths[split].name,
                "sequences": packers[split].sequences,
                "tokens": packers[split].sequences * cfg.seq_len,
                "sha256": checksums[split],
                "max_token_id": writers[split].max_token_id,
            }
            for split in splits
        },
    }


# --------------------------------------------------------------------------------------------------
# The stateful shell: existing output, tokenizer, workers.
# --------------------------------------------------------------------------------------------------


def _header(
    cfg: PrepareConfig, fingerprint: dict[str, Any], convention: DocumentConvention
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": fingerprint,
        "seq_len": cfg.seq_len,
        "dtype": dtype_name(token_dtype(fingerprint["vocab_size"])),
        "bos_token_id": convention.bos_token_id,
        "eos_token_id": convention.eos_token_id,
        "seed": cfg.seed,
    }


def _check_same_header(out: Path, existing: dict[str, Any], header: dict[str, Any]) -> None:
    """Refuse to add to a directory prepared with other global settings."""

    def describe(metadata: dict[str, Any]) -> dict[str, str]:
        tok = metadata.get("tokenizer", {})
        return {
            "seq_len": f"seq_len {metadata.get('seq_len')}",
            "tokenizer": f"tokenizer {tok.get('name')} (sha256 {str(tok.get('sha256'))[:12]}…)",
            "bos_token_id": f"bos_token_id {metadata.get('bos_token_id')}",
            "eos_token_id": f"eos_token_id {metadata.get('eos_token_id')}",
            "seed": f"seed {metadata.get('seed')}",
        }

    old, new = describe(existing), describe(header)
    old_sha, new_sha = existing.get("tokenizer", {}).get("sha256"), header["tokenizer"]["sha256"]
    differ = [k for k in old if (old_sha != new_sha if k == "tokenizer" else old[k] != new[k])]
    if differ:
        held = ", ".join(old[k] for k in differ)
        asked = ", ".join(new[k] for k in differ)
        raise UserError(
            f"{out} holds data prepared with {held} (asked for {asked}); choose another out_dir or delete it"
        )


def _check_same_domain(out: Path, name: str, entry: dict[str, Any], cfg: PrepareConfig) -> None:
    spec = cfg.domains[name]
    if entry.get("sources") != list(spec.paths) or entry.get("options") != _domain_options(cfg, spec):
        raise UserError(
            f"domain {name!r} in {out} was prepared from {entry.get('sources')} with {entry.get('options')}, "
            f"not from {list(spec.paths)} with {_domain_options(cfg, spec)}; choose another out_dir or domain name"
        )


def _finished_problem(out: Path, metadata: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """None when a listed domain's token files exist with the right sizes, else what is wrong."""
    for split in entry["splits"]:
        problem = token_file_problem(out, metadata, entry["splits"][split])
        if problem is not None:
            return problem
    return None


def _in_config_order(domains: dict[str, Any], cfg: PrepareConfig) -> dict[str, Any]:
    """Domains of earlier runs that `cfg` does not name first, then `cfg`'s domains in its order."""
    others = {name: entry for name, entry in domains.items() if name not in cfg.domains}
    return others | {name: domains[name] for name in cfg.domains if name in domains}


def _save_tokenizer(tokenizer: Any, out: Path, fingerprint: dict[str, Any]) -> Path:
    """Save the tokenizer to `out/tokenizer` (replacing what is there) and check it reloads the same."""
    from transformers import AutoTokenizer

    target = out / TOKENIZER_DIR
    with publish_dir(target, replace=True) as staging:
        tokenizer.save_pretrained(str(staging))
        reloaded = AutoTokenizer.from_pretrained(str(staging))
        if tokenizer_fingerprint(reloaded)["sha256"] != fingerprint["sha256"]:
            raise UserError(
                f"tokenizer {fingerprint['name']} does not reload identically from save_pretrained; use num_workers 1"
            )
    return target


def prepare_data(cfg: PrepareConfig, tokenizer: Any = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize and pack every domain of `cfg` into `cfg.out_dir` (see the module docstring).

    Args:
        cfg: What to prepare.
        tokenizer: A fast `transformers` tokenizer; None loads the tokenizer of `cfg.source`.
        progress: Show a tqdm bar per domain.

    Returns:
        The metadata written to `out_dir/metadata.json`.

    With `num_workers > 1` the tokenizer processes are started with "spawn"; a script calling this
    must do so under `if __name__ == "__main__":`, as for any multiprocessing pool.

    Raises:
        UserError: On a missing input, a domain without documents or too small for its eval and
            one train sequence, a bad document_end_token, or an out_dir holding data prepared with
            another tokenizer, seq_len, seed or document convention (nothing is overwritten then).
    """
    out = Path(cfg.out_dir)
    existing = read_metadata(out) if (out / METADATA_FILE).exists() else None
    for spec in cfg.domains.values():
        expand_paths(spec.paths)  # a missing input fails now, not after the first domains
    if tokenizer is None:
        from sheared.model import load_tokenizer  # the source's tokenizer only, not its weights

        tokenizer = load_tokenizer(cfg.source)
    fingerprint = tokenizer_fingerprint(tokenizer)
    convention = document_convention(tokenizer, cfg.document_end_token)
    header = _header(cfg, fingerprint, convention)
    if existing is not None:
        _check_same_header(out, existing, header)
        for name in cfg.domains:
            if name in existing.get("domains", {}):
                _check_same_domain(out, name, existing["domains"][name], cfg)
    metadata = existing if existing is not None else {**header, "domains": {}}

    todo = []
    for name in cfg.domains:
        entry = metadata["domains"].get(name)
        problem = None if entry is None else _finished_problem(out, metadata, entry)
        if entry is not None and problem is None:
            print(f"skip {name}: already prepared")
        else:
            if entry is not None:
                print(f"redo {name}: {problem}")
            todo.append(name)
    if not todo:
        return metadata

    with guard_writes(out):  # a full disk or a read-only folder: one line; finished domains stay
        out.mkdir(parents=True, exist_ok=True)
        for name in todo:
            if metadata["domains"].pop(name, None) is not None:
                write_metadata(out, metadata)  # never list files that are about to be replaced
        tokenizer_dir = _save_tokenizer(tokenizer, out, fingerprint)  # what the workers load

        with document_encoder(tokenizer, str(tokenizer_dir), convention, cfg.num_workers) as encoder:
            for name in todo:
                metadata["domains"][name] = _prepare_domain(
                    name, cfg, out, fingerprint["vocab_size"], encoder, progress
                )
                metadata["domains"] = _in_config_order(metadata["domains"], cfg)
                write_metadata(out, metadata)
    return metadata


# --------------------------------------------------------------------------------------------------
# Auto-prepare: what a run does when its data folder holds no prepared data yet.
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoPrepare:
    """How to make the prepared data when `data.path` holds none yet."""

    corpus: Literal["tiny", "sample"] = "sample"
    """`tiny`: two small domains from the Python standard library (a second, offline anywhere);
    `sample`: the seven-domain sample corpus (`sheared data sample-corpus`)."""
    corpus_dir: str = "data/corpus"
    """Where the corpus JSONL files are (built there if missing)."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    eval_sequences: int = 16
    """Held-out sequences per domain (what results report)."""
    val_sequences: int | None = None
    """Validation sequences per domain (what dynamic batch loading reweights on; None: as many as
    `eval_sequences`; 0: none)."""
    max_train_sequences: int | None = 2000
    """Training sequences per domain (None: all)."""
    num_workers: int = 1
    """Tokenizer processes (the fast tokenizer already uses every core of a small machine)."""


def ensure_prepared(
    path: str | Path, auto: AutoPrepare | None, tokenizer: Any, source_spec: str, progress: bool = True
) -> None:
    """Build the corpus and prepare it into `path` when that holds no prepared data and `auto` says how.

    Otherwise (data already there, or `auto` is None) do nothing, and leave it to
    `PreparedData.open` to complain about missing data.

    Args:
        path: The prepared directory a run reads.
        auto: How to make it; None makes nothing.
        tokenizer: The run's source tokenizer (a fast `transformers` tokenizer).
        source_spec: The source the tokenizer came from (recorded as `PrepareConfig.source`).
        progress: Show progress bars.
    """
    if (Path(path) / METADATA_FILE).is_file() or auto is None:
        return
    if auto.corpus == "tiny":
        from sheared.data.corpus import build_tiny_corpus

        build_tiny_corpus(auto.corpus_dir)
    else:
        from sheared.data.corpus import build_sample_corpus

        build_sample_corpus(auto.corpus_dir, progress=progress, keep_unpacked=False)  # only its text is read
    prepare_cfg = prepare_config_from_flags(
        str(path),
        [],
        auto.corpus_dir,
        source=source_spec,
        seq_len=auto.seq_len,
        eval_sequences=auto.eval_sequences,
        val_sequences=auto.val_sequences,
        max_train_sequences=auto.max_train_sequences,
        num_workers=auto.num_workers,
    )
    prepare_data(prepare_cfg, tokenizer=tokenizer, progress=progress)
