"""Sample corpus builder: the pure text helpers on hand-made inputs, the code domain end to end."""

import bz2
import json
import lzma
import shutil
import struct
import zlib

import pytest

from sheared.data.corpus import (
    DOMAINS,
    MIN_DOCUMENT_CHARS,
    build_sample_corpus,
    clean_text,
    decode_dictd_number,
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
from sheared.data.corpus.sources import (
    R_COMPRESS_BZIP2,
    R_COMPRESS_XZ,
    R_COMPRESS_ZLIB,
    _decompress_lazyload_blob,
)
from sheared.errors import UserError

# MB of text per domain measured for CORPUS.md (the slow test asks for at least 30% of each).
CORPUS_MD_MEGABYTES = {
    "code": 31.5,
    "latex": 24.1,
    "books": 20.7,
    "encyclopedic": 6.8,
    "web": 18.5,
    "prose": 38.1,
    "qa": 1.0,
}
MIN_FRACTION_OF_CORPUS_MD = 0.3
NUM_TEST_DOCUMENTS = 25


def read_records(path):
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


# ------------------------------------------------------------------------------------------------
# Pure helpers.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("digits", "value"),
    [
        ("A", 0),
        ("B", 1),
        ("/", 63),
        ("BA", 64),  # 1*64 + 0
        ("gt", 2093),  # g=32, t=45: 32*64 + 45
        ("Tt3u", 5168622),  # T=19, t=45, 3=55, u=46: ((19*64 + 45)*64 + 55)*64 + 46
        ("", 0),
    ],
)
def test_decode_dictd_number(digits, value):
    assert decode_dictd_number(digits) == value


def test_decode_dictd_number_rejects_other_characters():
    with pytest.raises(ValueError, match="'='"):
        decode_dictd_number("AB=")


def test_parse_dictd_index_skips_metadata_and_aliases():
    index = "00-database-info\tCP\tuo\nunix\tTt3u\tgt\nUNIX\tTt3u\tgt\nemacs\tBA\tB\n"
    assert parse_dictd_index(index) == [("unix", 5168622, 2093), ("emacs", 64, 1)]


def test_clean_text():
    assert clean_text("\ufeff  line one\r\nline two\rthree\n\n") == "line one\nline two\nthree"


def test_html_to_text():
    page = """<!DOCTYPE html><html><head><title>Ignored title</title>
    <style>p { color: red; }</style></head>
    <body><script>var x = "<p>not text</p>";</script>
    <h1>Heading &amp; more</h1>
    <p>First   paragraph,
       wrapped <b>in</b> <i>source</i>.</p>
    <p>Second<br>line two</p>
    <ul><li>one</li><li>two</li></ul>
    <pre>
  indented   code
    more</pre>
    <table><tr><td>a</td><td>b</td></tr></table>
    </body></html>"""
    assert html_to_text(page) == (
        "Heading & more\n\n"
        "First paragraph, wrapped in source.\n\n"
        "Second\nline two\n\n"
        "one\ntwo\n\n"
        "  indented   code\n    more\n\n"
        "a b"
    )


def test_split_pod_faq():
    pod = (
        "=head1 NAME\n\nperlfaq4 - Data Manipulation\n\n"
        "=head1 Data: Numbers\n\n"
        "=head2 Why is int() broken?\n\n"
        "Your C<int()> is most probably working just fine.\n\n"
        '    print int(0.6/0.2-2), "\\n";\n\n'
        "=head2 How do I round?\n\nUse C<sprintf>.\n\n"
        "=head1 Data: Dates\n\nIntro text that belongs to no question.\n\n"
        "=head2 How do I find the day?\n\nUse C<localtime>.\n\n"
        "=cut\n\nTrailing text after cut.\n"
    )
    assert split_pod_faq(pod) == [
        (
            "Why is int() broken?",
            'Why is int() broken?\n\nYour C<int()> is most probably working just fine.\n\n    print int(0.6/0.2-2), "\\n";',
        ),
        ("How do I round?", "How do I round?\n\nUse C<sprintf>."),
        ("How do I find the day?", "How do I find the day?\n\nUse C<localtime>."),
    ]


def test_split_rst_sections():
    rst = (
        ":tocdepth: 2\n\n"
        "===============\nProgramming FAQ\n===============\n\n"
        "General Questions\n=================\n\n"
        "Is there a debugger?\n--------------------\n\nYes.\n\n"
        "    code block\n    ----------\n\n"
        "Why?\n----\n\nBecause.\n"
    )
    assert split_rst_sections(rst) == [
        ("Programming FAQ", "Programming FAQ"),
        ("General Questions", "General Questions"),
        ("Is there a debugger?", "Is there a debugger?\n\nYes.\n\n    code block\n    ----------"),
        ("Why?", "Why?\n\nBecause."),
    ]


def test_split_asciidoc_faq():
    text = (
        "gitfaq(7)\n=========\n\nConfiguration\n-------------\n\n"
        "[[user-name]]\nWhat should I put in `user.name`?::\n\tYour name.\n+\nMore.\n\n"
        "[[editor]]\nHow do I set an editor?::\n\tSet `core.editor`.\n\n"
        "SEE ALSO\n--------\nlinkgit:git[1]\n"
    )
    assert split_asciidoc_faq(text) == [
        ("What should I put in `user.name`?", "What should I put in `user.name`?\n\nYour name.\n+\nMore."),
        ("How do I set an editor?", "How do I set an editor?\n\nSet `core.editor`."),
    ]


def test_split_info_nodes():
    info = (
        "This is efaq.info, produced by makeinfo.\n\n"
        "\x1f\nFile: efaq.info,  Node: Top,  Next: Basics,  Up: (dir)\n\nThe GNU Emacs FAQ\n"
        "\x1f\nFile: efaq.info,  Node: Basics,  Prev: Top\n\nHow do I quit?\n\nC-x C-c.\n"
        "\x1f\nTag Table:\nNode: Top\x7f42\n\x1f\nEnd Tag Table\n"
    )
    assert split_info_nodes(info) == [("Top", "The GNU Emacs FAQ"), ("Basics", "How do I quit?\n\nC-x C-c.")]


def test_split_html_sections():
    page = (
        '<div class="toc"><p>Table of Contents</p></div>'
        '<div class="section"><h2 class="title">1.1. What is Debian?</h2><p>An OS.</p></div>'
        '<div class="section"><h2 class="title">1.2. Who?</h2><p>People.</p></div>'
    )
    assert split_html_sections(page) == [
        ("1.1. What is Debian?", "1.1. What is Debian?\n\nAn OS."),
        ("1.2. Who?", "1.2. Who?\n\nPeople."),
    ]


def test_split_bible_books():
    text = (
        "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth was\nwithout form 2\n\n"
        "Genesis 2\n\n  1 Thus.\n\n1 Samuel 1\n\n  1 Now there was.\n"
    )
    books = split_bible_books(text)
    assert [book for book, _ in books] == ["Genesis", "1 Samuel"]
    assert books[0][1].startswith("Genesis 1\n") and "Genesis 2\n\n  1 Thus." in books[0][1]
    assert "without form 2" in books[0][1]  # a wrapped verse line is not indented but is no heading
    assert books[1][1] == "1 Samuel 1\n\n  1 Now there was."


def test_split_novel_chapters():
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse.", "CHAPTER II", "Mr. Weston."]
    assert split_novel_chapters(lines) == [
        ("front matter", "EMMA"),
        ("VOLUME I", "VOLUME I"),
        ("CHAPTER I", "CHAPTER I\n\nEmma Woodhouse."),
        ("CHAPTER II", "CHAPTER II\nMr. Weston."),
    ]


@pytest.mark.parametrize(
    ("method", "tag", "compress"),
    [
        (R_COMPRESS_ZLIB, b"", zlib.compress),
        (R_COMPRESS_BZIP2, b"2", bz2.compress),
        (R_COMPRESS_XZ, b"Z", lzma.compress),
        (R_COMPRESS_XZ, b"0", lambda payload: payload),  # stored uncompressed
    ],
)
def test_decompress_lazyload_blob_round_trip(method, tag, compress):
    payload = b"X\n\x00\x00\x00\x03serialized R object"
    blob = struct.pack(">I", len(payload)) + tag + compress(payload)
    assert _decompress_lazyload_blob(blob, method) == payload


# ------------------------------------------------------------------------------------------------
# The builder (code domain only: it needs nothing but the running interpreter).
# ------------------------------------------------------------------------------------------------


def test_code_domain_builds_then_is_cached(tmp_path):
    (report,) = build_sample_corpus(
        tmp_path, ["code"], progress=False, max_documents_per_domain=NUM_TEST_DOCUMENTS
    )
    path = tmp_path / "code.jsonl"
    records = read_records(path)
    assert report.domain == "code" and not report.cached
    assert report.documents == len(records) == NUM_TEST_DOCUMENTS
    assert report.characters == sum(len(r["text"]) for r in records)
    assert report.sources == ["python-stdlib"] and report.skipped == []
    for record in records:
        assert set(record) == {"text", "source"}
        assert len(record["text"]) >= MIN_DOCUMENT_CHARS
        assert record["source"].startswith("python-stdlib:") and record["source"].endswith(".py")
    sources = [r["source"] for r in records]
    assert sources == sorted(sources) and len(set(sources)) == len(sources)
    assert not (tmp_path / "code.jsonl.tmp").exists()

    content, mtime = path.read_bytes(), path.stat().st_mtime_ns
    (again,) = build_sample_corpus(tmp_path, ["code"], progress=False)
    assert again.cached
    assert (again.documents, again.characters, again.sources) == (
        report.documents,
        report.characters,
        report.sources,
    )
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime


def test_builds_are_deterministic(tmp_path):
    for name in ("a", "b"):
        build_sample_corpus(tmp_path / name, "code", progress=False, max_documents_per_domain=5)
    assert (tmp_path / "a" / "code.jsonl").read_bytes() == (tmp_path / "b" / "code.jsonl").read_bytes()


def test_leftover_tmp_file_is_not_taken_as_cached(tmp_path):
    (tmp_path / "code.jsonl.tmp").write_text('{"text": "half a recor')
    (report,) = build_sample_corpus(tmp_path, ["code"], progress=False, max_documents_per_domain=3)
    assert not report.cached and report.documents == 3
    assert not (tmp_path / "code.jsonl.tmp").exists()


def test_unknown_domain_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"'wikipedia'.*code, latex, books, encyclopedic, web, prose, qa"):
        build_sample_corpus(tmp_path, ["code", "wikipedia"], progress=False)
    assert not (tmp_path / "code.jsonl").exists()  # validated before building anything


def test_missing_apt_skips_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get, no dpkg
    (report,) = build_sample_corpus(tmp_path / "out", ["encyclopedic"], progress=False)
    assert (report.documents, report.cached) == (0, False)
    assert report.skipped == [f"{name}: apt-get not found (needs a Debian-based system)" for name in
                              ("dict-foldoc", "dict-jargon", "dict-devil")]  # fmt: skip
    assert not (tmp_path / "out" / "encyclopedic.jsonl").exists()  # nothing cached: retried next time


# ------------------------------------------------------------------------------------------------
# The real thing (downloads about 600 MB of Debian packages; a few minutes).
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg") is None, reason="needs apt")
def test_full_corpus_matches_corpus_md(tmp_path, monkeypatch):
    monkeypatch.chdir(
        tmp_path
    )  # a relative out_dir, as `make demo` passes (the bible program runs elsewhere)
    reports = build_sample_corpus("corpus", progress=False)
    tmp_path = tmp_path / "corpus"
    assert [r.domain for r in reports] == list(DOMAINS)
    for report in reports:
        assert report.skipped == [], report.skipped
        records = read_records(tmp_path / f"{report.domain}.jsonl")
        assert report.documents == len(records) > 0
        assert all(len(r["text"]) >= MIN_DOCUMENT_CHARS for r in records)
        megabytes = sum(len(r["text"].encode("utf-8")) for r in records) / 1e6
        expected = CORPUS_MD_MEGABYTES[report.domain]
        assert megabytes >= MIN_FRACTION_OF_CORPUS_MD * expected, (report.domain, megabytes, expected)


def test_the_unpacked_packages_go_once_the_corpus_is_written(tmp_path):
    out, cache = tmp_path / "corpus", tmp_path / "corpus" / ".cache"
    (cache / "trees" / "somepkg" / "usr").mkdir(parents=True)
    (cache / "trees" / "somepkg" / "usr" / "file.txt").write_text("x" * 1000)
    (cache / "debs").mkdir()
    (cache / "debs" / "somepkg_1.0_all.deb").write_bytes(b"deb")
    (out / "qa.jsonl").write_text(
        json.dumps({"text": "a question and its answer " * 20, "source": "t"}) + "\n"
    )
    build_sample_corpus(out, ["qa"], progress=False)  # kept by default
    assert (cache / "trees" / "somepkg").is_dir()
    build_sample_corpus(out, ["qa"], progress=False, keep_unpacked=False)
    assert not (cache / "trees").exists() and (cache / "debs" / "somepkg_1.0_all.deb").is_file()
