"""`sheared export RUN --out OUT --gguf-type T`: the HF export and its GGUF file are built in one folder
and swapped in together. Relative paths work (the README's commands), and a SIGKILL at any moment
leaves OUT as the previous export, its GGUF file included, or the complete new one.

The run is a tiny random LLaMA with a 300-token byte-level BPE vocabulary (SmolLM2's 49,152 tokens
would make every GGUF read-back take seconds), pruned for two steps on the tiny corpus.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch
from helpers import tree_bytes

from sheared.cli import main
from sheared.export import REPORT_FILE, gguf_path

BPE_VOCAB = 300
KILLS = 4
POLL_S = 0.002


@pytest.fixture(scope="module")
def bpe_run(tiny_assets, tmp_path_factory):
    """A two-step pruning run of a tiny random source with a small byte-level BPE tokenizer; and a
    checkpoint of it at step 1 (a different export of the same run)."""
    from helpers import train_bpe_tokenizer

    from sheared.config import load_config
    from sheared.data.prepare import AutoPrepare, ensure_prepared
    from sheared.model import CausalLM, ModelArgs, save_hf
    from sheared.model.families import hf_config_from_args
    from sheared.train.config import PruneConfig
    from sheared.train.loop import run

    root = tmp_path_factory.mktemp("bpe-run")
    tokenizer = train_bpe_tokenizer(BPE_VOCAB)
    args = ModelArgs(  # the tiny config's source shape
        family="llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    model = CausalLM(args)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    save_hf(model, root / "source", tokenizer=tokenizer, base_config=hf_config_from_args(args, ids))
    auto = AutoPrepare(
        corpus="tiny",
        corpus_dir=str(tiny_assets / "corpus"),
        seq_len=64,
        eval_sequences=2,
        max_train_sequences=40,
    )
    ensure_prepared(root / "prepared", auto, tokenizer, str(root / "source"), progress=False)
    overrides = [
        f"source={root / 'source'}",
        f"data.path={root / 'prepared'}",
        "data.auto_prepare=null",
        "train.steps=2",
        "train.save_interval=1",
        "train.eval_interval=2",
        "data.max_eval_sequences=1",
    ]
    run(load_config(PruneConfig, "configs/tiny/prune.yaml", overrides), root / "runs" / "r", progress=False)
    return root


def test_relative_paths_as_in_the_readme(bpe_run, monkeypatch, capsys):
    """`sheared export runs/r --out exports/e --gguf-type f16`, run from the folder that holds runs/."""
    monkeypatch.chdir(bpe_run)
    assert main(["export", "runs/r", "--out", "exports/e", "--gguf-type", "f16"]) == 0
    out = capsys.readouterr().out
    report = json.loads((bpe_run / "exports" / "e" / REPORT_FILE).read_text())
    entry = report["gguf"]
    assert entry["path"] == "exports/e/model-f16.gguf" and "gguf: exports/e/model-f16.gguf (f16," in out
    assert report["verified"] and entry["verified"] and entry["transformers_loader"]["ok"]
    assert entry["bytes"] == (bpe_run / "exports" / "e" / "model-f16.gguf").stat().st_size
    assert report["step"] == 2 and report["exported_shape"]["num_hidden_layers"] == 3
    assert sorted(p.name for p in (bpe_run / "exports").iterdir()) == ["e"]  # no build left beside it
    # A finished export given relatively gets another type.
    assert main(["export", "exports/e", "--gguf-type", "f32"]) == 0
    assert (
        json.loads((bpe_run / "exports" / "e" / REPORT_FILE).read_text())["gguf"]["max_abs_logit_diff"] == 0.0
    )
    assert not list((bpe_run / "exports" / "e").glob("*.tmp"))


def _start_export(argv: list[str]) -> int:
    """`main(argv)` in a forked child (the modules are already imported: it starts at once); its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            torch.set_num_threads(1)
            code = main(argv)
        finally:
            os._exit(code)
    return pid


def _finish(pid: int) -> tuple[int, float]:
    start = time.monotonic()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - start


def _export(argv: list[str]) -> float:
    """Run an export to the end in a child; its duration."""
    start = time.monotonic()
    code, _ = _finish(_start_export(argv))
    assert code == 0
    return time.monotonic() - start


def _kill(pid: int, delay: float, condition=None) -> None:
    """SIGKILL the child after `delay` seconds, or as soon as `condition()` holds (if it ends first,
    nothing is killed)."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline if condition is None else not condition():
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(POLL_S)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_sigkill_during_a_gguf_export_leaves_the_previous_export_or_the_new_one(bpe_run):
    """Kill `sheared export RUN --out OUT --force --gguf-type f16` at random moments (and once while its
    GGUF file is being written): OUT is byte for byte the previous export, GGUF file included, or the
    complete new one; the next run succeeds and leaves nothing beside OUT."""
    out = bpe_run / "killed" / "export"
    checkpoints = {
        1: str(bpe_run / "runs" / "r" / "checkpoints" / "step_000001"),
        2: str(bpe_run / "runs" / "r"),
    }

    def argv(step):
        return ["export", checkpoints[step], "--out", str(out), "--force", "--gguf-type", "f16"]

    exports = {}  # the complete export of each step, as written uninterrupted into OUT
    durations = []
    for step in (1, 2):
        durations.append(_export(argv(step)))
        exports[step] = tree_bytes(out)
    assert exports[1][REPORT_FILE] != exports[2][REPORT_FILE]
    assert exports[1]["model-f16.gguf"] != exports[2]["model-f16.gguf"]
    rng = random.Random(0)
    building_gguf = out.with_name("export.export-tmp") / "model-f16.gguf.tmp"
    current, outcomes = 2, []
    for k in range(KILLS):
        new = 3 - current  # the other checkpoint, so that the new export differs from the previous
        pid = _start_export(argv(new))
        if k == 0:  # the moment of the original bug: the GGUF file half written
            _kill(pid, 0.0, condition=building_gguf.exists)
        else:
            _kill(pid, rng.uniform(0.0, max(durations)))
        got = tree_bytes(out)
        assert got in (exports[current], exports[new]), f"kill {k}: OUT is neither export"
        outcomes.append("previous" if got == exports[current] else "new")
        print(f"kill {k}: OUT holds the {outcomes[-1]} export")
        current = current if got == exports[current] else new
    assert "previous" in outcomes  # at least one kill fell before the swap
    assert main(argv(3 - current)) == 0  # the next run replaces it, and cleans what the kills left
    assert tree_bytes(out) == exports[3 - current]
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["gguf"]["path"] == str(gguf_path(out, "f16")) and report["gguf"]["verified"]


def test_a_gguf_that_fails_verification_replaces_nothing(bpe_run, tmp_path, monkeypatch, capsys):
    """The HF export verifies, its GGUF file does not: the previous export stays, GGUF file included,
    and the whole build is kept as OUT.unverified/ for inspection."""
    from sheared.export import gguf as gguf_export
    from sheared.export.gguf import GGUFTolerance

    out = tmp_path / "export"
    argv = ["export", str(bpe_run / "runs" / "r"), "--out", str(out), "--force", "--gguf-type", "f16"]
    assert main(argv) == 0
    before = tree_bytes(out)
    strict = GGUFTolerance(logit_atol=0.0, logit_rtol=0.0, loss_rel_diff=0.0)  # f16 rounding cannot pass
    monkeypatch.setitem(gguf_export.TOLERANCES, "f16", strict)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("sheared: error:") == 1
    kept = tmp_path / "export.unverified"
    assert err.splitlines()[-1].startswith(
        "sheared: error: GGUF export failed verification, nothing was replaced: "
        f"{kept / 'model-f16.gguf.unverified'} failed verification: our GGUF reader: max |logit diff|"
    )
    assert tree_bytes(out) == before
    report = json.loads((kept / REPORT_FILE).read_text())
    assert report["verified"] and not report["gguf"]["verified"]  # the HF part passed, the file did not
    assert (
        report["gguf"]["path"] == str(kept / "model-f16.gguf.unverified")
        and (kept / "model-f16.gguf.unverified").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.unverified"]
