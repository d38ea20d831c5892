"""Reading documents from files: JSONL (plain, gzip, zstandard), Parquet, plain text, HF datasets.

`iter_documents` turns a list of files, directories and glob patterns into one deterministic stream
of `(text, source_id)` pairs:

- patterns are expanded and sorted; a directory stands for every file below it, sorted (names
  starting with "." are skipped, so a corpus folder's `.cache` is not read); a directory written by
  `datasets.Dataset.save_to_disk` is one input, not a folder of files;
- a file listed twice (say by a directory and a glob) is read once;
- `format="auto"` picks the reader per input by its name or content: `*.jsonl[.gz|.zst]` is JSONL,
  `*.parquet` is Parquet, a saved dataset directory is `hf_dataset`, anything else is one text
  document per file.

A JSONL record's `source` field (the sample corpus writes one) becomes the source id; otherwise the
id is `file:line` (or `file:row` for tables).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from sheared.errors import UserError

FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet", "text", "hf_dataset")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
GZIP_SUFFIX = ".gz"
ZSTD_SUFFIX = ".zst"
# `Dataset.save_to_disk` writes these two next to its Arrow files; `DatasetDict` writes the third.
HF_DATASET_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json")
HF_DATASET_DICT_MARKER = "dataset_dict.json"
GLOB_CHARACTERS = frozenset("*?[")
SOURCE_FIELD = "source"  # the JSONL field (or table column) naming where a document came from
TABLE_BATCH_ROWS = 1024  # rows per Arrow batch when reading Parquet files and saved datasets


def is_hf_dataset_dir(path: Path) -> bool:
    """True when `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if not path.is_dir():
        return False
    markers = (*HF_DATASET_MARKERS, HF_DATASET_DICT_MARKER)
    return any((path / marker).is_file() for marker in markers)


def detect_format(path: Path) -> str:
    """The reader `auto` picks for one input: "jsonl", "parquet", "hf_dataset" or "text"."""
    if is_hf_dataset_dir(path):
        return "hf_dataset"
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIX):
        return "parquet"
    return "text"


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _files_below(directory: Path) -> list[Path]:
    """Every input below `directory`, sorted; saved datasets count as one input, hidden names are skipped."""
    found: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if _is_hidden(entry):
            continue
        if is_hf_dataset_dir(entry):
            found.append(entry)
        elif entry.is_dir():
            found.extend(_files_below(entry))
        elif entry.is_file():
            found.append(entry)
    return found


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """The inputs that `paths` (files, directories, glob patterns) stand for, in a deterministic order.

    Args:
        paths: Files, directories and glob patterns (`**` recurses), in the order to read them.

    Returns:
        Files and saved-dataset directories; each pattern's matches sorted, each directory's
        content sorted, duplicates dropped (first occurrence kept).

    Raises:
        UserError: If `paths` is empty, or one of them (a path or a pattern) matches nothing.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("no input paths given; give files, directories or glob patterns")
    inputs: dict[Path, None] = {}  # an ordered set
    for raw in paths:
        pattern = str(Path(raw).expanduser())
        if GLOB_CHARACTERS & set(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        elif Path(pattern).exists():
            matches = [Path(pattern)]
        else:
            raise UserError(f"input path {raw!r} does not exist")
        found: list[Path] = []
        for match in matches:
            if match.is_dir() and not is_hf_dataset_dir(match):
                found.extend(_files_below(match))
            else:
                found.append(match)
        if not found:
            raise UserError(f"input {raw!r} matches no files")
        inputs.update(dict.fromkeys(found))
    return list(inputs)


def _open_text(path: Path) -> IO[str]:
    """A text stream over `path`, decompressing `.gz` and `.zst` files on the fly."""
    name = path.name.lower()
    if name.endswith(GZIP_SUFFIX):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(ZSTD_SUFFIX):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 -- owned and closed by the returned wrapper
        return io.TextIOWrapper(
            zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8"
        )
    return open(path, encoding="utf-8")


def _decompression_errors(path: Path) -> tuple[type[Exception], ...]:
    """Exceptions that mean "this file is damaged or not what its name says"."""
    errors: tuple[type[Exception], ...] = (UnicodeDecodeError, EOFError, OSError)
    if path.name.lower().endswith(ZSTD_SUFFIX):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    damaged = _decompression_errors(path)
    with _open_text(path) as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}: line {number} is not a JSON object")
                if text_field not in record:
                    fields = ", ".join(map(str, record)) or "none"
                    raise UserError(
                        f"{path}: line {number} has no field {text_field!r} (its fields: {fields}); "
                        "set text_field to the field that holds the text"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}: line {number} field {text_field!r} is a {type(text).__name__}, not a string"
                    )
                source = record.get(SOURCE_FIELD)
                yield text, source if isinstance(source, str) else f"{path}:{number}"
        except damaged as e:
            raise UserError(f"{path}: cannot read it as {_describe(path)} ({e})") from None


def _describe(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(GZIP_SUFFIX):
        return "gzip-compressed UTF-8 JSONL"
    if name.endswith(ZSTD_SUFFIX):
        return "zstandard-compressed UTF-8 JSONL"
    return "UTF-8 JSONL"


def _table_rows(
    batches: Iterator[dict[str, list]], where: Path, text_field: str, has_source: bool
) -> Iterator[tuple[str, str]]:
    """(text, source_id) of table rows given as column batches; null texts are skipped."""
    row = 0
    for batch in batches:
        texts = batch[text_field]
        sources = batch[SOURCE_FIELD] if has_source else [None] * len(texts)
        for text, source in zip(texts, sources, strict=True):
            if text is not None:
                if not isinstance(text, str):
                    raise UserError(
                        f"{where}: row {row} column {text_field!r} is a {type(text).__name__}, not a string"
                    )
                yield text, source if isinstance(source, str) else f"{where}:{row}"
            row += 1


def _missing_column(where: Path, text_field: str, columns: Sequence[str]) -> UserError:
    return UserError(
        f"{where} has no column {text_field!r} (its columns: {', '.join(columns) or 'none'}); "
        "set text_field to the column that holds the text"
    )


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for non-Parquet files
        raise UserError(f"{path} is not a readable Parquet file ({e})") from None
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise _missing_column(path, text_field, columns)
    has_source = SOURCE_FIELD in columns and text_field != SOURCE_FIELD
    wanted = [text_field, SOURCE_FIELD] if has_source else [text_field]
    batches = (b.to_pydict() for b in table.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=wanted))
    yield from _table_rows(batches, path, text_field, has_source)


def _read_hf_dataset(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    if not is_hf_dataset_dir(path):
        raise UserError(f"{path} is not a dataset directory written by datasets' save_to_disk")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    # A DatasetDict holds several splits; they are read one after another, in their saved order.
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in parts:
        where = path / split if split else path
        columns = dataset.column_names
        if text_field not in columns:
            raise _missing_column(where, text_field, columns)
        has_source = SOURCE_FIELD in columns and text_field != SOURCE_FIELD
        wanted = [text_field, SOURCE_FIELD] if has_source else [text_field]
        batches = dataset.select_columns(wanted).iter(batch_size=TABLE_BATCH_ROWS)
        yield from _table_rows(batches, where, text_field, has_source)


def _read_text(path: Path) -> Iterator[tuple[str, str]]:
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not UTF-8 text; remove it from the inputs or give its format (jsonl, parquet, hf_dataset)"
        ) from None
    yield text, str(path)


def check_format(format: str) -> str:
    """`format` if it is one of `FORMATS`, else a UserError listing them."""
    if format not in FORMATS:
        raise UserError(f"unknown input format {format!r}; valid formats: {', '.join(FORMATS)}")
    return format


def iter_documents(
    paths: Sequence[str], format: str = "auto", text_field: str = "text"
) -> Iterator[tuple[str, str]]:
    """Every document of the inputs, as `(text, source_id)`, in a deterministic order.

    Args:
        paths: Files, directories and glob patterns (see `expand_paths`).
        format: One of `FORMATS`; "auto" picks per input (see `detect_format`), anything else is
            used for every input.
        text_field: The JSONL field / Parquet or dataset column that holds the text (plain text
            files ignore it).

    Yields:
        `(text, source_id)`: the document and where it came from (the record's `source` field when
        it has one, else `path:line` for JSONL, `path:row` for tables, the path for text files).

    Raises:
        UserError: On an unknown format, an input that matches nothing, a JSONL line that is not a
            JSON object with `text_field`, or a table without the `text_field` column.
    """
    check_format(format)
    for path in expand_paths(paths):
        kind = detect_format(path) if format == "auto" else format
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field)
        elif kind == "parquet":
            yield from _read_parquet(path, text_field)
        elif kind == "hf_dataset":
            yield from _read_hf_dataset(path, text_field)
        else:
            yield from _read_text(path)
