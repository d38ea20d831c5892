"""Prepared data on disk: tokenizer fingerprints, atomic token files, checked opening, random access."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sheared.data.prepare import DomainInput, PrepareConfig, prepare_data
from sheared.data.tokens import (
    METADATA_FILE,
    PreparedData,
    TokenFileWriter,
    check_tokenizer,
    token_dtype,
    tokenizer_fingerprint,
    write_token_file,
)
from sheared.errors import UserError
from sheared.files import TMP_SUFFIX

WORDS = tuple(f"w{i}" for i in range(40))
SEQ_LEN = 8
EVAL_SEQUENCES = 2


def word_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer: <unk>=0, <|endoftext|>=1, then `words`."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>")


@pytest.fixture
def prepared(tmp_path):
    """A prepared directory with domains `b` and `a` (in that order) from the word tokenizer."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with (tmp_path / f"{name}.jsonl").open("w") as f:
            for _ in range(30):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))}) + "\n")
    cfg = PrepareConfig(
        out_dir=str(tmp_path / "out"),
        domains={name: DomainInput([str(tmp_path / f"{name}.jsonl")]) for name in ("b", "a")},
        seq_len=SEQ_LEN,
        eval_sequences=EVAL_SEQUENCES,
        num_workers=1,
    )
    prepare_data(cfg, word_tokenizer(), progress=False)
    return tmp_path / "out"


# ------------------------------------------------------------------------------------------------
# Tokenizer identity.
# ------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_differs_between_vocabularies(tmp_path, smollm2_tok):
    fingerprint = tokenizer_fingerprint(smollm2_tok)
    assert fingerprint["vocab_size"] == len(smollm2_tok) == 49152
    assert fingerprint["class"] == type(smollm2_tok).__name__
    assert fingerprint["name"] == smollm2_tok.name_or_path
    assert len(fingerprint["sha256"]) == 64
    smollm2_tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(reloaded)["sha256"] == fingerprint["sha256"]

    words = word_tokenizer()
    same = tokenizer_fingerprint(words)["sha256"]
    assert tokenizer_fingerprint(word_tokenizer())["sha256"] == same  # built twice
    words.backend_tokenizer.enable_padding(pad_id=0)  # a runtime setting, not the tokenizer
    assert tokenizer_fingerprint(words)["sha256"] == same
    assert tokenizer_fingerprint(word_tokenizer((*WORDS, "w40")))["sha256"] != same
    assert tokenizer_fingerprint(word_tokenizer(WORDS[::-1]))["sha256"] != same  # same words, other ids


def test_check_tokenizer_refuses_another_tokenizer(prepared, smollm2_tok):
    data = PreparedData.open(prepared)
    data.check_tokenizer(word_tokenizer())
    check_tokenizer(data.metadata, AutoTokenizer.from_pretrained(prepared / "tokenizer"), str(prepared))
    sha = data.metadata["tokenizer"]["sha256"]
    other = tokenizer_fingerprint(smollm2_tok)["sha256"]
    with pytest.raises(UserError) as e:
        data.check_tokenizer(smollm2_tok)
    message = str(e.value)
    assert message.startswith(f"data in {prepared} was prepared with tokenizer ")
    assert (
        f"(sha256 {sha[:12]}…), but the model's tokenizer is {smollm2_tok.name_or_path} (sha256 {other[:12]}…)"
        in message
    )
    assert message.endswith("prepare the data again with this model's tokenizer") and "\n" not in message


def test_token_dtype():
    assert token_dtype(1) == np.uint16
    assert token_dtype(49152) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32  # Llama-3
    assert token_dtype(151936).str == "<u4"  # Qwen2, little-endian on disk


# ------------------------------------------------------------------------------------------------
# Atomic token files.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_write_token_file_round_trip_and_checksum(tmp_path, dtype):
    tokens = np.arange(3 * SEQ_LEN, dtype=dtype).reshape(3, SEQ_LEN) * (1 + (dtype is np.uint32) * 5000)
    path = tmp_path / "x.bin"
    sha = write_token_file(path, tokens)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size == tokens.size * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(
        np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")), tokens.reshape(-1)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_token_file_writer_leaves_nothing_when_interrupted(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(RuntimeError), TokenFileWriter(path, np.dtype(np.uint16)) as writer:
        writer.write(np.arange(10))
        assert (tmp_path / f"x.bin{TMP_SUFFIX}").exists() and not path.exists()
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Opening prepared data.
# ------------------------------------------------------------------------------------------------


def test_open_reads_sequences(prepared):
    data = PreparedData.open(prepared)
    assert data.domains == ["b", "a"]  # metadata order
    assert (data.seq_len, data.vocab_size) == (SEQ_LEN, len(word_tokenizer()))
    for domain in data.domains:
        for split in ("train", "eval"):
            rows = np.fromfile(prepared / f"{domain}.{split}.bin", dtype="<u2").reshape(-1, SEQ_LEN)
            assert data.num_sequences(domain, split) == len(rows)
            assert data.num_tokens(domain, split) == rows.size
            index = np.arange(len(rows))[::-1]
            got = data.sequences(domain, split, index)
            assert got.dtype == torch.int64 and got.shape == (len(rows), SEQ_LEN)
            np.testing.assert_array_equal(got.numpy(), rows[index])
    assert data.num_sequences("a", "eval") == EVAL_SEQUENCES
    np.testing.assert_array_equal(
        data.sequences("a", "train", [1, 1, 0]).numpy()[0], data.sequences("a", "train", [1]).numpy()[0]
    )
    assert data.sequences("a", "eval", []).shape == (0, SEQ_LEN)
    with pytest.raises(IndexError, match=r"sequence index out of range for a.eval \(2 sequences\)"):
        data.sequences("a", "eval", [2])
    with pytest.raises(UserError, match=r"domain 'c' is not in .* \(domains: b, a\)"):
        data.num_sequences("c", "train")
    copy = pickle.loads(pickle.dumps(data))  # e.g. into a DataLoader worker: maps are reopened there
    assert torch.equal(copy.sequences("b", "train", [0, 2]), data.sequences("b", "train", [0, 2]))


def test_open_refuses_a_folder_without_metadata(tmp_path):
    with pytest.raises(
        UserError, match=r"is not prepared data \(no metadata.json\); run `sheared data prepare` first"
    ):
        PreparedData.open(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"metadata.json is not readable"):
        PreparedData.open(tmp_path)
    with pytest.raises(UserError, match=r"verify must be one of checksum, size, got 'quick'"):
        PreparedData.open(tmp_path, verify="quick")


def test_open_refuses_a_truncated_token_file(prepared):
    path = prepared / "a.train.bin"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-2])
    for verify in ("size", "checksum"):
        with pytest.raises(UserError) as e:
            PreparedData.open(prepared, verify=verify)
        assert str(e.value).startswith(f"{path} has {size - 2} bytes but metadata.json expects {size} (")
        assert "run `sheared data prepare` again" in str(e.value)
    path.unlink()
    with pytest.raises(UserError, match=r"a.train.bin is missing; run `sheared data prepare` again"):
        PreparedData.open(prepared)


def test_open_refuses_a_corrupted_token_file(prepared):
    path = prepared / "b.eval.bin"
    recorded = json.loads((prepared / METADATA_FILE).read_text())["domains"]["b"]["splits"]["eval"]["sha256"]
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(UserError) as e:
        PreparedData.open(prepared)
    assert str(e.value) == (
        f"{path} has sha256 {actual[:12]}… but metadata.json records {recorded[:12]}…; "
        "the file is damaged: delete it and run `sheared data prepare` again"
    )
    PreparedData.open(prepared, verify="size")  # sizes alone cannot see it


# ------------------------------------------------------------------------------------------------
# Token ids against the vocabulary: checked when written, recorded, and read back on open.
# ------------------------------------------------------------------------------------------------


def test_the_writer_refuses_an_id_outside_the_vocabulary(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(UserError) as e, TokenFileWriter(path, np.dtype("<u2"), vocab_size=42) as writer:
        writer.write(np.arange(10))
        writer.write(np.array([3, 42, 7]))
    assert str(e.value) == f"{path}: token id 42 is outside the vocabulary of 42 ids; nothing was written"
    assert list(tmp_path.iterdir()) == []
    with TokenFileWriter(path, np.dtype("<u2"), vocab_size=42) as writer:
        writer.write(np.array([5, 41, 0]))
        writer.commit()
    assert writer.max_token_id == 41


def test_prepare_records_each_files_largest_id_and_open_trusts_it_by_checksum(prepared, monkeypatch):
    import sheared.data.tokens as tokens

    metadata = json.loads((prepared / METADATA_FILE).read_text())
    for entry in metadata["domains"].values():
        for split in entry["splits"].values():
            ids = np.fromfile(prepared / split["file"], dtype="<u2")
            assert split["max_token_id"] == int(ids.max()) < len(word_tokenizer())
    scanned = []
    real_scan, real_largest = tokens.scan_token_file, tokens.largest_token_id
    monkeypatch.setattr(tokens, "scan_token_file", lambda p, d: scanned.append(d) or real_scan(p, d))
    monkeypatch.setattr(tokens, "largest_token_id", lambda p, d: scanned.append(d) or real_largest(p, d))
    PreparedData.open(prepared)
    assert scanned == [None] * 6  # 2 domains × train, eval, val: hashed, their ids read from metadata.json
    scanned.clear()
    PreparedData.open(prepared, verify="size")
    assert scanned == []


@pytest.mark.parametrize("verify", ["checksum", "size"])
def test_open_refuses_an_id_outside_the_vocabulary_in_data_prepared_before_it_was_recorded(prepared, verify):
    path = prepared / "a.train.bin"
    ids = np.fromfile(path, dtype="<u2")
    ids[37] = len(word_tokenizer()) + 5  # 47: outside a vocabulary of 42
    ids.tofile(path)
    metadata = json.loads((prepared / METADATA_FILE).read_text())
    for entry in metadata["domains"].values():
        for split in entry["splits"].values():
            del split["max_token_id"]  # as data prepared by an older sheared
    metadata["domains"]["a"]["splits"]["train"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (prepared / METADATA_FILE).write_text(json.dumps(metadata))
    before = {f.name: f.read_bytes() for f in prepared.rglob("*") if f.is_file()}
    with pytest.raises(UserError) as e:
        PreparedData.open(prepared, verify=verify)
    assert {f.name: f.read_bytes() for f in prepared.rglob("*") if f.is_file()} == before
    assert str(e.value) == (
        f"{path} holds token id 47, outside the tokenizer's vocabulary of 42 ids: the file is damaged or was "
        "prepared with another tokenizer; delete it and run `sheared data prepare` again"
    )
    ids[37] = 41
    ids.tofile(path)
    metadata["domains"]["a"]["splits"]["train"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (prepared / METADATA_FILE).write_text(json.dumps(metadata))
    assert PreparedData.open(prepared, verify=verify).vocab_size == 42
