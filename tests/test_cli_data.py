"""`sheared data ...` on the command line: outputs, golden numbers, one-line errors, nothing lost."""

import json

import pytest

from sheared.cli import main
from sheared.data.corpus import build_tiny_corpus


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("sheared: error: ") and err.count("\n") == 1, err
    return err


def test_reference_loss_golden_table_and_json(tmp_path, capsys):
    out = tmp_path / "ref.json"
    argv = [
        "data",
        "reference-loss",
        "--losses",
        "configs/llama2-7b/scaling-law-losses.yaml",
        "--target-params",
        "1345423360",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "cc                    8.6339   0.0283  -2.7980     1.9643" in table
    saved = json.loads(out.read_text())
    assert saved["reference_losses"]["c4"] == pytest.approx(2.1251, abs=1e-4)
    before = out.read_bytes()
    assert main(argv) == 2  # an existing file is not replaced without --force
    assert "already exists" in _error(capsys)
    assert out.read_bytes() == before


def test_reference_loss_bad_file(tmp_path, capsys):
    (tmp_path / "l.yaml").write_text("sizes: [1, 2, 3]\n")
    assert main(["data", "reference-loss", "--losses", str(tmp_path / "l.yaml"), "--target-params", "5"]) == 2
    assert "must hold exactly two keys" in _error(capsys)


def test_prepare_from_flags_then_refuse_other_seq_len(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    build_tiny_corpus(corpus)
    out = tmp_path / "prepared"
    base = ["data", "prepare", "--out", str(out), "--corpus", str(corpus)]
    assert main([*base, "seq_len=64", "eval_sequences=2", "max_train_sequences=10", "num_workers=1"]) == 0
    table = capsys.readouterr().out
    assert "code" in table and "docs" in table
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seq_len"] == 64 and meta["domains"]["docs"]["splits"]["train"]["sequences"] == 10
    files = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert main([*base, "seq_len=128", "eval_sequences=2", "max_train_sequences=10", "num_workers=1"]) == 2
    assert "seq_len" in _error(capsys)
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--domain", "code"], "is not of the form NAME=PATH"),
        (["--domain", "code=/no/such/file.jsonl"], "/no/such/file.jsonl"),
        ([], "give --config FILE, or --out DIR"),
    ],
)
def test_prepare_bad_input(tmp_path, capsys, args, message):
    out = [] if not args else ["--out", str(tmp_path / "p")]
    assert main(["data", "prepare", *out, *args]) == 2
    assert message in _error(capsys)


def test_sample_corpus_code_domain(tmp_path, capsys):
    assert main(["data", "sample-corpus", "--out", str(tmp_path), "--domains", "code"]) == 0
    out = capsys.readouterr().out
    assert "code" in out and "built" in out
    first = json.loads((tmp_path / "code.jsonl").open().readline())
    assert first["source"].startswith("python-stdlib:") and len(first["text"]) >= 200
    assert main(["data", "sample-corpus", "--out", str(tmp_path), "--domains", "code"]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["data", "sample-corpus", "--out", str(tmp_path), "--domains", "cobol"]) == 2
    assert "unknown corpus domain 'cobol'" in _error(capsys)
