"""Tokenize-and-pack: readers of every format, the split, packing, resuming, refusals, auto-prepare."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import sheared.data.encode as encode_module
from sheared.data.corpus import TINY_DOMAINS
from sheared.data.encode import document_convention, encode_documents
from sheared.data.prepare import (
    AutoPrepare,
    DomainInput,
    PrepareConfig,
    ensure_prepared,
    prepare_config_from_flags,
    prepare_data,
)
from sheared.data.readers import iter_documents
from sheared.data.tokens import (
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    PreparedData,
    token_dtype,
    tokenizer_fingerprint,
)
from sheared.errors import UserError

SPECIAL_TOKENS = ("<unk>", "<s>", "<|endoftext|>")  # ids 0, 1, 2 of the word tokenizers
BOS_ID, EOS_ID = 1, 2
WORDS = tuple(f"w{i}" for i in range(50))
NUM_MARKERS = 200  # documents carry a unique marker word `docK`
MARKERS = tuple(f"doc{k}" for k in range(NUM_MARKERS))
LARGE_VOCAB_WORDS = 70_000  # > 65536: token files must be uint32
SEQ_LEN = 16
EVAL_SEQUENCES = 3


# ------------------------------------------------------------------------------------------------
# Tokenizers and inputs.
# ------------------------------------------------------------------------------------------------


def word_tokenizer(words=WORDS + MARKERS, *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer: ids 0-2 are <unk>, <s>, <|endoftext|>, then `words`."""
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:  # as Llama-3's tokenizer does
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def words_tok():
    return word_tokenizer()


def marked_documents(first: int, count: int, seed: int = 0) -> list[str]:
    """`count` documents `docK w.. w..` (K from `first`) of 3 to 20 words each."""
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(first, first + count):
        words = rng.choice(WORDS, size=int(rng.integers(2, 20)))
        docs.append(" ".join([MARKERS[k], *words]))
    return docs


def write_jsonl(path: Path, texts, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "source": f"{path.stem}-{i}", **extra}) + "\n")
    return path


def config(tmp_path: Path, domains: dict, **kw) -> PrepareConfig:
    values = {"seq_len": SEQ_LEN, "eval_sequences": EVAL_SEQUENCES, "num_workers": 1}
    values.update(kw)
    return PrepareConfig(
        out_dir=str(tmp_path / "out"),
        domains={k: DomainInput([str(p)]) for k, p in domains.items()},
        **values,
    )


def split_tokens(out: Path, domain: str, split: str, dtype=np.uint16) -> np.ndarray:
    return np.fromfile(out / f"{domain}.{split}.bin", dtype=np.dtype(dtype).newbyteorder("<"))


def markers_in(tokens: np.ndarray, tokenizer) -> set[str]:
    return {w for w in tokenizer.convert_ids_to_tokens(tokens.tolist()) if w.startswith("doc")}


def file_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*.bin"))}


# ------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------

READER_TEXTS = ["first document\nwith two lines", "second one", "third: ünïcödé"]


def _write_zst(path: Path, data: bytes) -> None:
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def _jsonl_bytes(with_source: bool) -> bytes:
    records = [
        {"text": t, **({"source": f"s{i}"} if with_source else {})} for i, t in enumerate(READER_TEXTS)
    ]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _make_input(kind: str, folder: Path) -> tuple[list[str], list[str]]:
    """Writes READER_TEXTS in format `kind`; returns (paths to read, expected source ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        (folder / "d.jsonl").write_bytes(_jsonl_bytes(with_source=True))
        return [str(folder / "d.jsonl")], ["s0", "s1", "s2"]
    if kind == "jsonl.gz":
        (folder / "d.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(with_source=False)))
        return [str(folder / "d.jsonl.gz")], [f"{folder / 'd.jsonl.gz'}:{i}" for i in (1, 2, 3)]
    if kind == "jsonl.zst":
        _write_zst(folder / "d.jsonl.zst", _jsonl_bytes(with_source=False))
        return [str(folder / "d.jsonl.zst")], [f"{folder / 'd.jsonl.zst'}:{i}" for i in (1, 2, 3)]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": READER_TEXTS, "n": [1, 2, 3]}), folder / "d.parquet")
        return [str(folder / "d.parquet")], [f"{folder / 'd.parquet'}:{i}" for i in range(3)]
    if kind == "text":
        for i, text in enumerate(READER_TEXTS):
            (folder / f"{i}.{'md' if i else 'txt'}").write_text(text, encoding="utf-8")
        return [str(folder / "*.*")], [str(folder / "0.txt"), str(folder / "1.md"), str(folder / "2.md")]
    if kind == "hf_dataset":
        import datasets

        datasets.Dataset.from_dict({"text": READER_TEXTS}).save_to_disk(str(folder / "ds"))
        return [str(folder / "ds")], [f"{folder / 'ds'}:{i}" for i in range(3)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text", "hf_dataset"])
def test_reader_reads_every_format_in_order(tmp_path, kind):
    paths, sources = _make_input(kind, tmp_path / "in")
    documents = list(iter_documents(paths))
    assert documents == list(zip(READER_TEXTS, sources))


def test_reader_explicit_format_and_text_field(tmp_path):
    path = tmp_path / "records.log"  # not a JSONL name: auto would read it as one text document
    path.write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "world"}) + "\n")
    assert [t for t, _ in iter_documents([str(path)])] == [path.read_text()]
    assert list(iter_documents([str(path)], format="jsonl", text_field="body")) == [
        ("hello", f"{path}:1"),
        ("world", f"{path}:3"),
    ]


def test_reader_directories_sorted_hidden_skipped_duplicates_once(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name, text in [("b.txt", "B"), ("a.rst", "A"), ("sub/c.md", "C"), (".cache/x.txt", "X"), (".h", "H")]:
        (folder / name).write_text(text)
    texts = [t for t, _ in iter_documents([str(folder), str(folder / "*.txt"), str(folder / "a.rst")])]
    assert texts == ["A", "B", "C"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', "line 2 has no field 'text'"),
        ('{"text": "ok"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"text": 3}\n', "line 1 field 'text' is a int, not a string"),
    ],
)
def test_reader_refuses_bad_jsonl_lines(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        list(iter_documents([str(path)]))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_missing_inputs_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match=r"input path '.*nope.jsonl' does not exist"):
        list(iter_documents([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(UserError, match=r"matches no files"):
        list(iter_documents([str(tmp_path / "*.parquet")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"matches no files"):
        list(iter_documents([str(tmp_path / "empty")]))
    with pytest.raises(UserError, match=r"unknown input format 'csv'; valid formats: auto, jsonl"):
        list(iter_documents([str(tmp_path)], format="csv"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"has no column 'text' \(its columns: content\)"):
        list(iter_documents([str(tmp_path / "t.parquet")]))


# ------------------------------------------------------------------------------------------------
# Document convention.
# ------------------------------------------------------------------------------------------------


def test_document_convention_of_families(smollm2_tok, words_tok):
    smol = document_convention(smollm2_tok)
    assert not smol.add_special_tokens and smol.bos_token_id is None
    assert smol.eos_token_id == smollm2_tok.convert_tokens_to_ids("<|endoftext|>") == 0
    # A literal "<|endoftext|>" inside a document is text: the only EOS is the appended one.
    tokens, lengths = encode_documents(smollm2_tok, ["a <|endoftext|> b", "c"], smol)
    assert lengths[1] == 2 and lengths.sum() == len(tokens)
    assert np.flatnonzero(tokens == 0).tolist() == [lengths[0] - 1, len(tokens) - 1]
    llama3_like = document_convention(word_tokenizer(add_bos=True))
    assert llama3_like.add_special_tokens
    assert (llama3_like.bos_token_id, llama3_like.eos_token_id) == (BOS_ID, EOS_ID)
    assert document_convention(words_tok, document_end_token="w7").eos_token_id == len(SPECIAL_TOKENS) + 7
    with pytest.raises(UserError, match=r"document_end_token 'w7 w8' is not a single token"):
        document_convention(words_tok, document_end_token="w7 w8")


# ------------------------------------------------------------------------------------------------
# Tokenize and pack.
# ------------------------------------------------------------------------------------------------


def test_round_trip_with_smollm2(tmp_path, smollm2_tok):
    rng = np.random.default_rng(0)
    texts = [
        f"Document {k}: "
        + " ".join(rng.choice(["alpha", "beta", "γάμμα", "def f(x):", "\n", "  return"], 30))
        for k in range(40)
    ]
    write_jsonl(tmp_path / "in" / "d.jsonl", texts)
    metadata = prepare_data(
        config(tmp_path, {"d": tmp_path / "in"}, seq_len=64, eval_sequences=2), smollm2_tok
    )
    out = tmp_path / "out"
    assert (
        metadata["dtype"] == "uint16" and metadata["eos_token_id"] == 0 and metadata["bos_token_id"] is None
    )
    for split in SPLITS:
        decoded = smollm2_tok.decode(split_tokens(out, "d", split).tolist(), skip_special_tokens=False)
        *whole, tail = decoded.split("<|endoftext|>")
        # Each split's stream starts at a document: every piece before the last EOS is a whole document.
        assert whole and all(piece in texts for piece in whole)
        assert any(text.startswith(tail) for text in texts)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(out / TOKENIZER_DIR)) == {
        **tokenizer_fingerprint(smollm2_tok),
        "name": str(out / TOKENIZER_DIR),
    }


def test_documents_are_split_not_shared_and_packed_exactly(tmp_path, words_tok):
    docs = marked_documents(0, 60)
    write_jsonl(tmp_path / "a.jsonl", docs)
    metadata = prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}), words_tok, progress=False)
    out, entry = tmp_path / "out", metadata["domains"]["a"]
    eval_tokens, train_tokens = split_tokens(out, "a", "eval"), split_tokens(out, "a", "train")
    val_tokens = split_tokens(out, "a", "val")
    assert eval_tokens.size == val_tokens.size == EVAL_SEQUENCES * SEQ_LEN  # val defaults to eval's size
    assert entry["splits"]["eval"]["sequences"] == entry["splits"]["val"]["sequences"] == EVAL_SEQUENCES
    eval_markers, train_markers = markers_in(eval_tokens, words_tok), markers_in(train_tokens, words_tok)
    val_markers = markers_in(val_tokens, words_tok)
    assert not eval_markers & train_markers and not val_markers & train_markers
    assert not eval_markers & val_markers
    assert len(eval_markers) == entry["documents"]["eval"] and len(val_markers) == entry["documents"]["val"]
    assert entry["documents"]["eval"] + entry["documents"]["val"] + entry["documents"]["train"] == len(docs)
    # Train keeps every full sequence of its documents: fewer than seq_len tokens are dropped.
    train_doc_tokens = sum(len(d.split()) + 1 for d in docs if d.split()[0] in train_markers)
    assert 0 <= train_doc_tokens - train_tokens.size < SEQ_LEN + max(len(d.split()) + 1 for d in docs)
    assert train_tokens.size == entry["splits"]["train"]["sequences"] * SEQ_LEN > 0
    # Each document is `marker words EOS`: an EOS is always followed by the next document's marker.
    after_eos = train_tokens[1:][train_tokens[:-1] == EOS_ID]
    assert all(w.startswith("doc") for w in words_tok.convert_ids_to_tokens(after_eos.tolist()))
    # Different seeds shuffle documents differently.
    other = prepare_data(
        config(tmp_path / "seed1", {"a": tmp_path / "a.jsonl"}, seed=1), words_tok, progress=False
    )
    assert other["domains"]["a"]["splits"]["eval"]["sha256"] != entry["splits"]["eval"]["sha256"]


def test_bos_is_prepended_when_the_tokenizer_adds_it(tmp_path):
    tok = word_tokenizer(add_bos=True)
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 40))
    metadata = prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}), tok, progress=False)
    assert (metadata["bos_token_id"], metadata["eos_token_id"]) == (BOS_ID, EOS_ID)
    tokens = split_tokens(tmp_path / "out", "a", "train")
    assert tokens[0] == BOS_ID and tok.convert_ids_to_tokens(int(tokens[1])).startswith("doc")
    assert (tokens[1:][tokens[:-1] == EOS_ID] == BOS_ID).all()


def test_min_chars_and_max_train_sequences(tmp_path, words_tok):
    docs = marked_documents(0, 60)
    write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl"}, min_chars=40, max_train_sequences=4)
    metadata = prepare_data(cfg, words_tok, progress=False)
    entry = metadata["domains"]["a"]
    assert entry["splits"]["train"]["sequences"] == 4
    kept = markers_in(np.concatenate([split_tokens(tmp_path / "out", "a", s) for s in SPLITS]), words_tok)
    short = {d.split()[0] for d in docs if len(d) < 40}
    assert short and not kept & short
    assert entry["documents"]["train"] < len(docs) - len(short) - entry["documents"]["eval"]  # stopped early


def test_uint16_and_uint32_token_files(tmp_path, words_tok):
    assert token_dtype(len(words_tok)) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big_words = tuple(f"w{i}" for i in range(LARGE_VOCAB_WORDS)) + MARKERS
    big = word_tokenizer(big_words)
    high = [f"w{i}" for i in range(LARGE_VOCAB_WORDS - 40, LARGE_VOCAB_WORDS)]  # ids above 65535
    docs = [f"doc{k} " + " ".join(high[k % 20 : k % 20 + 10]) for k in range(40)]
    write_jsonl(tmp_path / "a.jsonl", docs)
    metadata = prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}), big, progress=False)
    assert metadata["dtype"] == "uint32" and metadata["tokenizer"]["vocab_size"] == len(big) > 65536
    tokens = split_tokens(tmp_path / "out", "a", "train", np.uint32)
    assert tokens.max() > 65535
    assert tokens.size * 4 == (tmp_path / "out" / "a.train.bin").stat().st_size
    assert set(big.convert_ids_to_tokens(tokens.tolist())) <= {*high, *MARKERS, "<|endoftext|>"}


def test_metadata_is_complete_and_matches_the_files(tmp_path, words_tok):
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 50))
    write_jsonl(tmp_path / "b" / "b.jsonl", marked_documents(50, 50))
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl", "b": tmp_path / "b"}, seed=3)
    metadata = prepare_data(cfg, words_tok, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / METADATA_FILE).read_text()) == metadata
    assert metadata["format_version"] == 1
    assert metadata["tokenizer"] == tokenizer_fingerprint(words_tok)
    assert set(metadata["tokenizer"]) == {"name", "class", "vocab_size", "sha256"}
    assert (metadata["seq_len"], metadata["dtype"], metadata["seed"]) == (SEQ_LEN, "uint16", 3)
    assert (metadata["bos_token_id"], metadata["eos_token_id"]) == (None, EOS_ID)
    assert list(metadata["domains"]) == ["a", "b"]
    for name, entry in metadata["domains"].items():
        assert entry["sources"] == [str(cfg.domains[name].paths[0])]
        assert set(entry["documents"]) == set(entry["splits"]) == {"train", "eval", "val"}
        for split, info in entry["splits"].items():
            data = (out / info["file"]).read_bytes()
            assert info["file"] == f"{name}.{split}.bin"
            assert info["tokens"] == info["sequences"] * SEQ_LEN
            assert len(data) == info["tokens"] * 2
            assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(out.glob("*.tmp")) and not (out / f"{TOKENIZER_DIR}.tmp").exists()
    data = PreparedData.open(out)
    assert data.domains == ["a", "b"] and data.num_sequences("b", "eval") == EVAL_SEQUENCES


def test_one_and_two_workers_write_identical_files(tmp_path, smollm2_tok, monkeypatch):
    monkeypatch.setattr(encode_module, "CHUNK_DOCUMENTS", 3)  # many chunks, so their order matters
    rng = np.random.default_rng(1)
    texts = [
        f"Doc {k} " + " ".join(rng.choice(["one", "two", "three", "four!"], int(rng.integers(5, 80))))
        for k in range(60)
    ]
    write_jsonl(tmp_path / "a.jsonl", texts)
    write_jsonl(tmp_path / "b.jsonl", texts[::-1])
    domains = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    one = prepare_data(config(tmp_path / "one", domains, seq_len=32), smollm2_tok, progress=False)
    two = prepare_data(
        config(tmp_path / "two", domains, seq_len=32, num_workers=2), smollm2_tok, progress=False
    )
    assert one["domains"] == two["domains"]
    for name in ("a.train.bin", "a.eval.bin", "b.train.bin", "b.eval.bin"):
        assert (tmp_path / "one/out" / name).read_bytes() == (tmp_path / "two/out" / name).read_bytes()


# ------------------------------------------------------------------------------------------------
# Re-runs, crashes and refusals.
# ------------------------------------------------------------------------------------------------


def test_rerun_skips_finished_domains_and_redoes_damaged_ones(tmp_path, words_tok, capsys):
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 50))
    write_jsonl(tmp_path / "b.jsonl", marked_documents(50, 50))
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"})
    first = prepare_data(cfg, words_tok, progress=False)
    out = tmp_path / "out"
    before = file_state(out)
    capsys.readouterr()
    assert prepare_data(cfg, words_tok, progress=False) == first
    assert file_state(out) == before  # same bytes, same mtimes: nothing rewritten
    printed = capsys.readouterr().out
    assert "skip a: already prepared" in printed and "skip b: already prepared" in printed
    (out / "b.train.bin").unlink()
    assert prepare_data(cfg, words_tok, progress=False) == first
    after = file_state(out)
    assert after["a.train.bin"] == before["a.train.bin"] and after["a.eval.bin"] == before["a.eval.bin"]
    assert after["b.train.bin"][1] == before["b.train.bin"][1]  # rebuilt, identical
    assert "redo b:" in capsys.readouterr().out


def test_crash_in_second_domain_keeps_the_first_and_resumes(tmp_path, words_tok, monkeypatch, capsys):
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 50))
    write_jsonl(tmp_path / "b.jsonl", marked_documents(50, 50))
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"})
    real_encode = encode_module.encode_documents
    chunks_of_b = []

    def crash_in_b(tokenizer, texts, convention):
        if any(int(text.split()[0].removeprefix("doc")) >= 50 for text in texts):  # domain b's markers
            chunks_of_b.append(len(texts))
            if len(chunks_of_b) == 2:  # after b's first chunk was packed into its temporary files
                raise RuntimeError("simulated crash")
        return real_encode(tokenizer, texts, convention)

    monkeypatch.setattr(encode_module, "CHUNK_DOCUMENTS", 8)
    monkeypatch.setattr(encode_module, "encode_documents", crash_in_b)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(cfg, words_tok, progress=False)
    out = tmp_path / "out"
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert list(metadata["domains"]) == ["a"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.eval.bin",
        "a.train.bin",
        "a.val.bin",
        METADATA_FILE,
        TOKENIZER_DIR,
    ]
    PreparedData.open(out)  # sizes and checksums of domain a hold
    a_files = file_state(out)

    monkeypatch.setattr(encode_module, "encode_documents", real_encode)
    capsys.readouterr()
    resumed = prepare_data(cfg, words_tok, progress=False)
    assert list(resumed["domains"]) == ["a", "b"] and resumed["domains"]["a"] == metadata["domains"]["a"]
    assert "skip a: already prepared" in capsys.readouterr().out
    assert {k: v for k, v in file_state(out).items() if k.startswith("a.")} == a_files
    PreparedData.open(out)


def test_refuses_empty_and_too_small_domains(tmp_path, words_tok):
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(UserError, match=r"domain 'e' has no documents in .*empty.jsonl"):
        prepare_data(config(tmp_path, {"e": tmp_path / "empty.jsonl"}), words_tok, progress=False)
    write_jsonl(tmp_path / "short.jsonl", ["doc1 w1", "doc2 w2 w3"])
    with pytest.raises(UserError, match=r"no documents with at least 100 characters"):
        prepare_data(
            config(tmp_path, {"s": tmp_path / "short.jsonl"}, min_chars=100), words_tok, progress=False
        )
    write_jsonl(tmp_path / "small.jsonl", marked_documents(0, 5))
    tokens = sum(len(d.split()) + 1 for d in marked_documents(0, 5))
    with pytest.raises(
        UserError,
        match=rf"domain 'small' is too small: its 5 documents have {tokens} tokens, but 3 eval and 3 "
        rf"validation sequences need 96 tokens plus 16 for one train sequence \(seq_len 16\); lower "
        rf"eval_sequences, val_sequences or seq_len, or add documents",
    ):
        prepare_data(config(tmp_path, {"small": tmp_path / "small.jsonl"}), words_tok, progress=False)
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob("*.tmp"))
    assert not (tmp_path / "out" / METADATA_FILE).exists()


def test_refuses_missing_input_before_any_work(tmp_path, words_tok):
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 50))
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl", "b": tmp_path / "missing.jsonl"})
    with pytest.raises(UserError, match=r"input path '.*missing.jsonl' does not exist"):
        prepare_data(cfg, words_tok, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_out_dir_prepared_differently(tmp_path, words_tok):
    write_jsonl(tmp_path / "a.jsonl", marked_documents(0, 80))
    prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}), words_tok, progress=False)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(
        UserError,
        match=rf"{out} holds data prepared with seq_len 16 \(asked for seq_len 8\); choose another out_dir",
    ):
        prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}, seq_len=8), words_tok, progress=False)
    other = word_tokenizer((*WORDS, *MARKERS, "extra"))
    with pytest.raises(
        UserError, match=r"holds data prepared with tokenizer .* \(asked for tokenizer .*delete it"
    ):
        prepare_data(config(tmp_path, {"a": tmp_path / "a.jsonl"}), other, progress=False)
    with pytest.raises(UserError, match=r"domain 'a' in .* was prepared from .* with .*'eval_sequences': 3"):
        prepare_data(
            config(tmp_path, {"a": tmp_path / "a.jsonl"}, eval_sequences=2), words_tok, progress=False
        )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq_len": 1}, "seq_len must be at least 2, got 1"),
        ({"eval_sequences": 0}, "eval_sequences must be at least 1, got 0"),
        ({"num_workers": 0}, "num_workers must be at least 1, got 0"),
        ({"max_train_sequences": 0}, "max_train_sequences must be at least 1"),
        ({"domains": {}}, "no domains given"),
        ({"domains": {"a/b": DomainInput(["x"])}}, "domain name 'a/b' may only use"),
        ({"domains": {"a": {"paths": ["x"], "format": "csv"}}}, "'csv' is not one of 'auto', 'jsonl'"),
    ],
)
def test_config_validation(change, message):
    values = {"out_dir": "out", "domains": {"a": DomainInput(["x"])}, **change}
    with pytest.raises(UserError, match=message):
        PrepareConfig(**values)


def test_config_from_flags(tmp_path):
    corpus = tmp_path / "corpus"
    for name in ("code", "books"):
        write_jsonl(corpus / f"{name}.jsonl", ["x"])
    (corpus / ".cache").mkdir()
    cfg = prepare_config_from_flags(
        str(tmp_path / "out"), ["web=a.jsonl, b/*.parquet"], str(corpus), seq_len="256", num_workers=None
    )
    assert list(cfg.domains) == ["books", "code", "web"]
    assert cfg.domains["code"].paths == [str(corpus / "code.jsonl")]
    assert cfg.domains["web"].paths == ["a.jsonl", "b/*.parquet"]
    assert (cfg.seq_len, cfg.num_workers) == (256, 2)
    with pytest.raises(UserError, match=r"domain 'web' is not of the form NAME=PATH\[,PATH...\]"):
        prepare_config_from_flags("out", ["web"], None)
    with pytest.raises(UserError, match=r"domain 'code' is given twice"):
        prepare_config_from_flags("out", ["code=x.jsonl"], str(corpus))
    with pytest.raises(UserError, match=r"no domains given"):
        prepare_config_from_flags("out", [], None)
    with pytest.raises(UserError, match=r"has no \*.jsonl files"):
        prepare_config_from_flags("out", [], str(tmp_path / "corpus" / ".cache"))
    with pytest.raises(UserError, match=r"unknown config key 'seq_length'"):
        prepare_config_from_flags("out", ["a=x"], None, seq_length=3)


def test_prepare_loads_the_source_tokenizer_when_none_is_given(tmp_path, smollm2_tok):
    write_jsonl(tmp_path / "a.jsonl", ["Some text. " * 200, "Other text! " * 200, "Third text? " * 200])
    cfg = config(tmp_path, {"a": tmp_path / "a.jsonl"}, seq_len=32, eval_sequences=2, source="smollm2-135m")
    metadata = prepare_data(cfg, progress=False)
    assert metadata["tokenizer"]["sha256"] == tokenizer_fingerprint(smollm2_tok)["sha256"]


# ------------------------------------------------------------------------------------------------
# Auto-prepare: what a run does when its data folder holds nothing yet.
# ------------------------------------------------------------------------------------------------

AUTO_SEQ_LEN, AUTO_EVAL_SEQUENCES, AUTO_TRAIN_SEQUENCES = 64, 2, 3
SMOLLM2_ENDOFTEXT_ID = 0  # SmolLM2's document end; it prepends no BOS


def tree_state(*folders: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below the folders: its modification time and bytes."""
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_ensure_prepared_without_auto_prepare_makes_nothing(tmp_path, smollm2_tok):
    ensure_prepared(tmp_path / "prepared", None, smollm2_tok, "smollm2-135m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_prepared_builds_the_tiny_corpus_and_data_once(tmp_path, smollm2_tok, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "prepared"
    auto = AutoPrepare(
        corpus="tiny",
        corpus_dir=str(corpus),
        seq_len=AUTO_SEQ_LEN,
        eval_sequences=AUTO_EVAL_SEQUENCES,
        max_train_sequences=AUTO_TRAIN_SEQUENCES,
        num_workers=1,
    )
    ensure_prepared(out, auto, smollm2_tok, "smollm2-135m", progress=False)

    assert sorted(p.name for p in corpus.iterdir()) == [f"{domain}.jsonl" for domain in TINY_DOMAINS]
    data = PreparedData.open(out)
    assert data.domains == list(TINY_DOMAINS) and data.seq_len == AUTO_SEQ_LEN
    assert data.metadata["eos_token_id"] == SMOLLM2_ENDOFTEXT_ID and data.metadata["bos_token_id"] is None
    assert data.metadata["tokenizer"]["sha256"] == tokenizer_fingerprint(smollm2_tok)["sha256"]
    for domain in TINY_DOMAINS:
        assert data.metadata["domains"][domain]["sources"] == [str(corpus / f"{domain}.jsonl")]
        assert data.num_sequences(domain, "eval") == AUTO_EVAL_SEQUENCES
        assert data.num_sequences(domain, "train") == AUTO_TRAIN_SEQUENCES
        assert data.sequences(domain, "train", [0]).shape == (1, AUTO_SEQ_LEN)
    printed = capsys.readouterr().out
    assert (
        f"code: {AUTO_TRAIN_SEQUENCES} train + {AUTO_EVAL_SEQUENCES} eval + {AUTO_EVAL_SEQUENCES} val "
        "sequences of 64 tokens" in printed
    )

    before = tree_state(corpus, out)
    ensure_prepared(out, auto, smollm2_tok, "smollm2-135m", progress=False)
    assert capsys.readouterr().out == ""  # prepare_data did not even run to say "skip"
    assert tree_state(corpus, out) == before
