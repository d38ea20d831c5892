"""The command line: help, info on HF directories, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from helpers import tiny_hf_model

from sheared.cli import main


def test_help_runs_as_console_script():
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    out = subprocess.run([bin_dir / "sheared", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "demo" in out


def test_info_json_on_hf_directory(tmp_path, capsys):
    tiny_hf_model(family="qwen2", heads=6, kv_heads=2, tied=True).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2" and info["num_key_value_heads"] == 2 and info["tie_word_embeddings"]
    # 48*72 + 2*48*24 + 72*48 (q,k,v,o) + 72 + 2*24 (q/k/v biases)
    assert info["num_params_attention_per_layer"] == 9336
    # embedding 97*48 + 2 layers * (attention + mlp 3*48*80 + norms 2*48) + final norm 48
    assert info["num_params"] == 97 * 48 + 2 * (9336 + 11520 + 96) + 48


def test_info_table(tmp_path, capsys):
    tiny_hf_model(family="llama").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "num_params" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "/no/such/model"], "does not exist"),
        (["demo", "max_new_tokens=0"], "max_new_tokens must be at least 1"),
        (["demo", "max_new_token=3"], "did you mean 'max_new_tokens'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--run-dir", str(tmp_path)] if argv[0] == "demo" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sheared: error: ") and message in err and err.count("\n") == 1


def test_help_describes_learned_and_one_shot_pruning(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per entry: the checks do not depend on wrapping
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "masks learned while training (pruning.method=l0, the default) or one-shot" in out
    assert "no training steps" in out and "SPEC" not in out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for words in (
        "pruning.method=l0 (the default) learns hard-concrete masks",
        "pruning.controller=projection",
        "lagrangian is the paper's Lagrangian constraint",
        "pruning.init=oneshot",
        "pruning.method=activation|magnitude|random prunes one-shot",
        "an unfinished one-shot run, which has no checkpoint, is done again",
    ):
        assert words in out, words
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "A one-shot run has no training steps" in capsys.readouterr().out
