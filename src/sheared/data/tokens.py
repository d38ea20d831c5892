"""Prepared data on disk: flat token files per domain and split, described by one metadata.json.

A prepared directory `OUT` (written by `sheared.data.prepare.prepare_data`) holds

    OUT/metadata.json          format version, tokenizer fingerprint, seq_len, dtype, BOS/EOS ids,
                               seed, and per domain: its inputs, document counts and, per split,
                               file name, number of sequences and tokens, sha256, largest token id
    OUT/<domain>.train.bin     the packed training sequences: (sequences, seq_len) tokens, row-major,
    OUT/<domain>.eval.bin      little-endian uint16 when the vocabulary fits (<= 65536), else uint32
    OUT/tokenizer/             the tokenizer, saved with `save_pretrained`

Every file appears atomically (written as `NAME.tmp`, flushed, fsynced, renamed), and metadata.json
is rewritten the same way after each finished domain, so a listed file always has its checksum.
`PreparedData.open` checks sizes (and by default checksums) before anything is trained on them, and
every file's token ids against the vocabulary: the largest id is recorded beside the checksum when
the file is written (and checked then), so opening reads it from metadata.json instead of scanning
the file again; data prepared before it was recorded is scanned (with the checksum, in one pass).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sheared.errors import UserError
from sheared.files import atomic_write_json, fsync_dir, tmp_path

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
SPLITS: tuple[str, ...] = ("train", "eval")  # every prepared domain has these
# The validation split dynamic batch loading reweights on (SPEC §11); data prepared before it has none.
VAL_SPLIT = "val"
UINT16_VOCAB_LIMIT = 65536  # ids 0..65535 fit in an unsigned 16-bit integer
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on disk
HASH_BLOCK_BYTES = 1 << 22  # read size when hashing token files
SHORT_HASH_CHARS = 12  # how much of a sha256 messages show
PREPARE_COMMAND = "sheared data prepare"
VERIFY_MODES: tuple[str, ...] = ("checksum", "size")
# Runtime settings of a Rust tokenizer that change when a caller asks for padding or truncation;
# they are not part of what the tokenizer is, so the fingerprint ignores them.
TOKENIZER_RUNTIME_KEYS: tuple[str, ...] = ("padding", "truncation")


# --------------------------------------------------------------------------------------------------
# Tokenizer identity.
# --------------------------------------------------------------------------------------------------


def _short(sha256: str) -> str:
    return f"{sha256[:SHORT_HASH_CHARS]}…"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer: its name, class, vocabulary size and a hash of its full definition.

    Args:
        tokenizer: A fast `transformers` tokenizer (one with a Rust `backend_tokenizer`).

    Returns:
        `{"name": name_or_path, "class": class name, "vocab_size": len(tokenizer), "sha256": hex}`,
        where the hash covers the Rust tokenizer's JSON (vocabulary, merges, normalizer,
        pre-tokenizer, post-processor, added tokens) without its padding/truncation settings,
        serialized with sorted keys, so two loads of the same tokenizer agree.

    Raises:
        UserError: If the tokenizer is a slow (pure Python) one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no fast "
            "(Rust) version; sheared needs a fast tokenizer (a tokenizer.json)"
        )
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": _definition_sha256(backend.to_str()),
    }


_DEFINITION_HASHES: dict[str, str] = {}  # sha256 of a serialised tokenizer -> sha256 of its definition


def _definition_sha256(serialised: str) -> str:
    """The sha256 of the canonical definition (no runtime keys, sorted keys) of a serialised tokenizer.

    Remembered per serialisation: parsing and re-serialising a 50k-entry vocabulary takes a quarter of
    a second, and a study checks the same tokenizer dozens of times."""
    raw = hashlib.sha256(serialised.encode("utf-8")).hexdigest()
    if raw not in _DEFINITION_HASHES:
        definition = json.loads(serialised)
        for key in TOKENIZER_RUNTIME_KEYS:
            definition.pop(key, None)
        canonical = json.dumps(definition, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        if len(_DEFINITION_HASHES) >= 16:
            _DEFINITION_HASHES.clear()
        _DEFINITION_HASHES[raw] = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return _DEFINITION_HASHES[raw]


def check_tokenizer(metadata: dict[str, Any], tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer other than the one the data was prepared with.

    Args:
        metadata: A prepared directory's metadata (its "tokenizer" entry is compared).
        tokenizer: The model's tokenizer.
        where: The prepared directory, for the message.

    Raises:
        UserError: If the tokenizers' sha256 fingerprints differ.
    """
    prepared = metadata["tokenizer"]
    if tokenizer is None:
        raise UserError(
            f"the model has no tokenizer files (tokenizer.json), so it cannot be checked against the data in "
            f"{where} (prepared with {prepared['name']}); copy that tokenizer's files into the model directory"
        )
    current = tokenizer_fingerprint(tokenizer)
    if prepared["sha256"] != current["sha256"]:
        raise UserError(
            f"data in {where} was prepared with tokenizer {prepared['name']} (sha256 {_short(prepared['sha256'])}), "
            f"but the model's tokenizer is {current['name']} (sha256 {_short(current['sha256'])}); "
            "prepare the data again with this model's tokenizer"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id of a `vocab_size` vocabulary fits in it, else uint32."""
    assert vocab_size >= 1, vocab_size
    return DTYPES["uint16"] if vocab_size <= UINT16_VOCAB_LIMIT else DTYPES["uint32"]


def dtype_name(dtype: np.dtype) -> str:
    """The metadata name ("uint16" or "uint32") of a token dtype."""
    names = {d.newbyteorder("="): name for name, d in DTYPES.items()}
    return names[np.dtype(dtype).newbyteorder("=")]


def token_file_name(domain: str, split: str) -> str:
    """`<domain>.<split>.bin`."""
    return f"{domain}.{split}.bin"


# --------------------------------------------------------------------------------------------------
# Writing (atomically, see `sheared.files`).
# --------------------------------------------------------------------------------------------------


class TokenFileWriter:
    """Writes a token file piece by piece, hashing as it goes; the file appears only on `commit`.

    Use as a context manager: leaving the block without `commit` (on an exception, say) removes the
    temporary file, so a token file either exists complete or not at all.

        with TokenFileWriter(path, np.dtype("<u2"), vocab_size=49152) as writer:
            writer.write(tokens)  # (n,) integers, any integer dtype, each < vocab_size
            sha256 = writer.commit()

    `max_token_id` is the largest id written (-1 for none).
    """

    def __init__(self, path: str | Path, dtype: np.dtype, vocab_size: int | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tmp_path = tmp_path(self.path)
        self.num_tokens = 0
        self.max_token_id = -1
        self._hash = hashlib.sha256()
        self._limit = np.iinfo(self.dtype).max if vocab_size is None else vocab_size - 1
        self._vocab_size = vocab_size
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 -- closed by commit/abort

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` ((n,) integers, flattened if not 1-D) in the file's dtype.

        Raises:
            UserError: an id outside the vocabulary (or, without one, the dtype), naming the file.
        """
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high > self._limit:
            bad = low if low < 0 else high
            where = (
                f"the vocabulary of {self._vocab_size} ids"
                if self._vocab_size
                else f"the range of {self.dtype.name}"
            )
            raise UserError(f"{self.path}: token id {bad} is outside {where}; nothing was written")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += tokens.size
        self.max_token_id = max(self.max_token_id, high)

    def commit(self) -> str:
        """Flush, fsync and rename the temporary file into place; returns its sha256 (hex)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Close and remove the temporary file (nothing of it stays on disk)."""
        with contextlib.suppress(OSError):  # flushing what a full disk refused fails again; it closes anyway
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()  # after a commit there is no temporary file; after a failed one there may be


def write_token_file(path: str | Path, tokens: np.ndarray) -> str:
    """Write `tokens` (any shape, uint16 or uint32) as a flat little-endian file, atomically.

    Args:
        path: The token file; `path.tmp` is written first, fsynced and renamed over it.
        tokens: The tokens; their dtype is the file's dtype.

    Returns:
        The sha256 (hex) of the file's bytes.
    """
    tokens = np.asarray(tokens)
    with TokenFileWriter(path, tokens.dtype) as writer:
        writer.write(tokens)
        return writer.commit()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    return scan_token_file(path, None)[0]


def largest_token_id(path: str | Path, dtype: np.dtype) -> int:
    """The largest token id in a token file (-1 when empty), read once through a memory map."""
    if Path(path).stat().st_size == 0:
        return -1
    return int(np.memmap(path, dtype=dtype, mode="r").max())


def scan_token_file(path: str | Path, dtype: np.dtype | None) -> tuple[str, int]:
    """(sha256 hex, largest token id or -1) of a token file, read once in blocks; without a `dtype` the
    largest id is not computed (-1)."""
    digest, largest = hashlib.sha256(), -1
    itemsize = 1 if dtype is None else np.dtype(dtype).itemsize
    block_bytes = HASH_BLOCK_BYTES - HASH_BLOCK_BYTES % itemsize
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
            if dtype is not None and len(block) >= itemsize:
                ids = np.frombuffer(block, dtype=dtype, count=len(block) // itemsize)
                largest = max(largest, int(ids.max()))
    return digest.hexdigest(), largest


def write_metadata(directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write `directory/metadata.json` atomically (temporary file, fsync, rename)."""
    return atomic_write_json(Path(directory) / METADATA_FILE, metadata)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata of a prepared directory.

    Raises:
        UserError: If there is no readable metadata.json, or it is of another format version.
    """
    path = Path(directory) / METADATA_FILE
    not_prepared = f"{directory} is not prepared data (no {METADATA_FILE}); run `{PREPARE_COMMAND}` first"
    if not path.is_file():
        raise UserError(not_prepared)
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is not readable ({e}); run `{PREPARE_COMMAND}` again into a fresh folder"
        ) from None
    if not isinstance(metadata, dict) or "format_version" not in metadata:
        raise UserError(not_prepared)
    if metadata["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {metadata['format_version']!r}; this sheared reads version "
            f"{FORMAT_VERSION}; run `{PREPARE_COMMAND}` again into a fresh folder"
        )
    return metadata


def expected_file_bytes(metadata: dict[str, Any], split_entry: dict[str, Any]) -> int:
    """Bytes a token file must have: sequences × seq_len × bytes per token."""
    return split_entry["sequences"] * metadata["seq_len"] * DTYPES[metadata["dtype"]].itemsize


def token_file_problem(directory: Path, metadata: dict[str, Any], split_entry: dict[str, Any]) -> str | None:
    """None when a split's token file exists with the size metadata.json expects, else what is wrong."""
    path = directory / split_entry["file"]
    if not path.is_file():
        return f"{path} is missing"
    expected = expected_file_bytes(metadata, split_entry)
    actual = path.stat().st_size
    if actual != expected:
        return (
            f"{path} has {actual} bytes but {METADATA_FILE} expects {expected} "
            f"({split_entry['sequences']} sequences × {metadata['seq_len']} tokens × "
            f"{DTYPES[metadata['dtype']].itemsize} bytes)"
        )
    return None


def _check_token_file(path: Path, entry: dict[str, Any], metadata: dict[str, Any], verify: str) -> None:
    """Refuse a token file whose checksum (with `verify="checksum"`) differs from metadata.json, or that
    holds a token id outside the tokenizer's vocabulary.

    The largest id recorded beside the checksum when the file was written stands for the file's ids
    (the checksum ties it to these bytes), so only data prepared before it was recorded is scanned.
    """
    dtype = DTYPES[metadata["dtype"]]
    largest = entry.get("max_token_id")
    if verify == "checksum":
        actual, scanned = scan_token_file(path, dtype if largest is None else None)
        if actual != entry["sha256"]:
            raise UserError(
                f"{path} has sha256 {_short(actual)} but {METADATA_FILE} records {_short(entry['sha256'])}; "
                f"the file is damaged: delete it and run `{PREPARE_COMMAND}` again"
            )
        largest = scanned if largest is None else largest
    elif largest is None:
        largest = largest_token_id(path, dtype)
    vocab_size = metadata["tokenizer"]["vocab_size"]
    if largest >= vocab_size:
        raise UserError(
            f"{path} holds token id {largest}, outside the tokenizer's vocabulary of {vocab_size} ids: the file is "
            f"damaged or was prepared with another tokenizer; delete it and run `{PREPARE_COMMAND}` again"
        )


# --------------------------------------------------------------------------------------------------
# Reading prepared data.
# --------------------------------------------------------------------------------------------------


class PreparedData:
    """A prepared directory, checked, with random access to its sequences.

    Open it with `PreparedData.open(directory)`. Token files are memory-mapped read-only on first
    use (one map per file, kept by this object; not pickled, so copies in DataLoader workers map
    the files again).

    Attributes:
        directory: The prepared directory.
        metadata: The parsed metadata.json.
        seq_len: Tokens per sequence.
        domains: Domain names, in metadata order.
        vocab_size: Size of the tokenizer's vocabulary (`len(tokenizer)`).
        dtype: The token files' numpy dtype (little-endian uint16 or uint32).
    """

    def __init__(self, directory: str | Path, metadata: dict[str, Any]):
        self.directory = Path(directory)
        self.metadata = metadata
        self.seq_len: int = metadata["seq_len"]
        self.domains: list[str] = list(metadata["domains"])
        self.vocab_size: int = metadata["tokenizer"]["vocab_size"]
        self.dtype: np.dtype = DTYPES[metadata["dtype"]]
        self._maps: dict[tuple[str, str], np.memmap] = {}

    @classmethod
    def open(cls, directory: str | Path, verify: Literal["checksum", "size"] = "checksum") -> PreparedData:
        """Read and check a prepared directory.

        Args:
            directory: Where `prepare_data` wrote the data.
            verify: "checksum" checks every token file's size and sha256 against metadata.json;
                "size" only its size (fast for large data).

        Raises:
            UserError: If the directory is not prepared data, or a token file is missing or its
                size or checksum differs from metadata.json.
        """
        if verify not in VERIFY_MODES:
            raise UserError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        directory = Path(directory)
        metadata = read_metadata(directory)
        try:
            entries = [
                (domain, split, metadata["domains"][domain]["splits"][split])
                for domain in metadata["domains"]
                for split in (*SPLITS, VAL_SPLIT)
                if split in SPLITS or split in metadata["domains"][domain]["splits"]
            ]
            dtype_ok = metadata["dtype"] in DTYPES and isinstance(metadata["seq_len"], int)
        except (KeyError, TypeError) as e:
            raise UserError(
                f"{directory / METADATA_FILE} is incomplete (no {e}); run `{PREPARE_COMMAND}` again"
            ) from None
        if not dtype_ok:
            raise UserError(f"{directory / METADATA_FILE} has an unknown dtype {metadata['dtype']!r}")
        for _, _, entry in entries:
            problem = token_file_problem(directory, metadata, entry)
            if problem is not None:
                raise UserError(f"{problem}; run `{PREPARE_COMMAND}` again to rebuild it")
            _check_token_file(directory / entry["file"], entry, metadata, verify)
        return cls(directory, metadata)

    def _split(self, domain: str, split: str) -> dict[str, Any]:
        if domain not in self.metadata["domains"]:
            raise UserError(
                f"domain {domain!r} is not in {self.directory} (domains: {', '.join(self.domains)})"
            )
        if split not in (*SPLITS, VAL_SPLIT):
            raise UserError(f"split {split!r} is not one of {', '.join((*SPLITS, VAL_SPLIT))}")
        splits = self.metadata["domains"][domain]["splits"]
        if split not in splits:
            raise UserError(
                f"domain {domain!r} of {self.directory} has no {split} split (prepared before validation "
                f"splits existed); run `{PREPARE_COMMAND}` again to add one"
            )
        return splits[split]

    @property
    def decision_split(self) -> str:
        """The split that decisions (dynamic batch loading's reweighting) read: `val` when every domain
        has one, else `eval` (data prepared before validation splits: then the reported split is read
        by the reweighting too — the plan says so)."""
        has_val = all(VAL_SPLIT in self.metadata["domains"][d]["splits"] for d in self.domains)
        return VAL_SPLIT if has_val else "eval"

    def num_sequences(self, domain: str, split: str) -> int:
        """Number of `seq_len`-token sequences of a domain's split."""
        return self._split(domain, split)["sequences"]

    def num_tokens(self, domain: str, split: str) -> int:
        """Number of tokens of a domain's split (sequences × seq_len)."""
        return self._split(domain, split)["tokens"]

    def token_array(self, domain: str, split: str) -> np.memmap:
        """The split's tokens as a read-only (sequences, seq_len) memory map (uint16/uint32)."""
        key = (domain, split)
        if key not in self._maps:
            entry = self._split(domain, split)
            self._maps[key] = np.memmap(
                self.directory / entry["file"],
                dtype=self.dtype,
                mode="r",
                shape=(entry["sequences"], self.seq_len),
            )
        return self._maps[key]

    def sequences(self, domain: str, split: str, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Some sequences of a domain's split.

        Args:
            domain: A domain name.
            split: "train" or "eval".
            indices: (n,) sequence indices in [0, num_sequences), in the order wanted.

        Returns:
            (n, seq_len) int64 token ids.

        Raises:
            IndexError: If an index is out of range.
        """
        import torch

        array = self.token_array(domain, split)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(array)):
            raise IndexError(
                f"sequence index out of range for {domain}.{split} ({len(array)} sequences): "
                f"{int(index.min())}..{int(index.max())}"
            )
        rows = array[index]
        if rows.size and int(rows.max()) >= self.vocab_size:
            bad = int(index[np.flatnonzero((rows >= self.vocab_size).any(axis=1))[0]])
            raise UserError(
                f"{domain}.{split} sequence {bad} in {self.directory} holds token id {int(rows.max())}, outside the "
                f"tokenizer's vocabulary of {self.vocab_size}: the token file is damaged; prepare the data again "
                "(data.verify=checksum catches this before training)"
            )
        return torch.from_numpy(rows.astype(np.int64))

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one this data was prepared with (see `check_tokenizer`)."""
        check_tokenizer(self.metadata, tokenizer, str(self.directory))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened by each process
        return state
