"""A tiny two-domain corpus from the running Python alone, for smoke runs and tests.

- `code`: the standard library's `.py` files of a few packages (real source code);
- `docs`: the pydoc help topics shipped in `pydoc_data` (real English reference prose).

Builds in about a second on any machine, offline, with no package manager. Same JSONL format as
the sample corpus (`text` and `source` per record); cached like it.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from sheared.data.corpus.builder import MIN_DOCUMENT_CHARS
from sheared.files import atomic_write_lines

TINY_DOMAINS = ("code", "docs")
CODE_PACKAGES = ("json", "email", "logging", "asyncio", "importlib", "unittest")  # real, varied code


def _code_documents() -> list[dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for package in CODE_PACKAGES:
        for file in sorted((stdlib / package).rglob("*.py")):
            if "test" in file.relative_to(stdlib).parts[1:]:
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            if len(text) >= MIN_DOCUMENT_CHARS:
                records.append({"text": text, "source": f"python-stdlib:{file.relative_to(stdlib)}"})
    return records


def _docs_documents() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    return [
        {"text": text, "source": f"pydoc_data:{name}"}
        for name, text in sorted(topics.items())
        if len(text) >= MIN_DOCUMENT_CHARS
    ]


def build_tiny_corpus(out_dir: str | Path) -> dict[str, int]:
    """Write `code.jsonl` and `docs.jsonl` into `out_dir` (atomically; kept if present).

    Returns:
        domain -> number of documents in its file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain, build in (("code", _code_documents), ("docs", _docs_documents)):
        path = out / f"{domain}.jsonl"
        if not path.is_file():
            atomic_write_lines(path, (json.dumps(record, ensure_ascii=False) + "\n" for record in build()))
        with open(path, encoding="utf-8") as f:
            counts[domain] = sum(1 for _ in f)
    return counts
