"""SIGKILL `sheared data prepare` at random moments and in the middle of a token file write: after every
kill the folder lists only complete files, and a re-run finishes equal to an uninterrupted run byte for byte.

The command runs in a forked process (its imports already done, so that every kill lands while it reads,
tokenizes and writes, not while Python starts) through the command line's own `main`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_bytes
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sheared.cli import main
from sheared.data.tokens import METADATA_FILE, PreparedData, read_metadata

DOMAINS = ("code", "docs", "news", "web")
WORDS = tuple(f"w{i}" for i in range(300))
DOCUMENTS = 800  # per domain, 20 to 80 words each: about 40,000 tokens per domain
KILLS = 4
LATEST = 0.8  # kills land in the first 80% of a run's duration, so that the run is still going
POLL_S = 0.002
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A word-level tokenizer saved as a source folder, and four domains of documents."""
    root = tmp_path_factory.mktemp("prepare-kill")
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(root / "source")
    (root / "source" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a source folder
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        lines = [
            json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(20, 80)))}) for _ in range(DOCUMENTS)
        ]
        (root / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _argv(inputs: Path, out: Path) -> list[str]:
    domains = [arg for d in DOMAINS for arg in ("--domain", f"{d}={inputs / f'{d}.jsonl'}")]
    options = ["seq_len=32", "eval_sequences=4", "num_workers=1", f"source={inputs / 'source'}"]
    return ["data", "prepare", "--out", str(out), *domains, *options]


def _run_in_child(argv: list[str]) -> None:
    with open(os.devnull, "w") as quiet:
        os.dup2(quiet.fileno(), 1)
        os.dup2(quiet.fileno(), 2)
    os._exit(main(argv))


def _start(argv: list[str]) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(argv,))
    process.start()
    return process


def _kill_when(process: multiprocessing.Process, condition) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.exitcode is None, "prepare ended before the moment to kill it"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    process.kill()  # SIGKILL
    process.join()


def _writing_a_token_file(out: Path) -> bool:
    return out.is_dir() and any(p.name.endswith(".bin.tmp") for p in out.iterdir())


def _listed_files_are_whole(out: Path) -> None:
    """What metadata.json lists is complete and intact (checksums, ids); nothing else claims to be data."""
    if (out / METADATA_FILE).is_file() and read_metadata(out)["domains"]:
        PreparedData.open(out, verify="checksum")


def test_killed_prepare_reruns_to_the_uninterrupted_bytes(inputs, tmp_path, capsys):
    assert main(_argv(inputs, tmp_path / "expected")) == 0
    expected = tree_bytes(tmp_path / "expected")
    data_files = {f"{d}.{s}.bin" for d in DOMAINS for s in ("train", "eval", "val")} | {METADATA_FILE}
    assert {k for k in expected if not k.startswith("tokenizer/")} == data_files
    started = time.perf_counter()
    process = _start(_argv(inputs, tmp_path / "timed"))
    process.join()
    duration = time.perf_counter() - started  # of a whole run in a forked process, as the killed ones run

    rng = random.Random(0)
    # each attempt on a fresh folder: killed at a random moment of a whole run, or the moment a token
    # file is half written, or both in a row (a first kill in the first half of a run, then the re-run
    # killed while it writes: a re-run skips the domains already prepared, so a second random moment
    # could come after it ended); then run again to the end
    moments = [[rng.uniform(0, LATEST * duration)] for _ in range(KILLS)]
    attempts = [*moments, [rng.uniform(0, duration / 2), "writing"], ["writing"]]
    for n, kills in enumerate(attempts):
        out = tmp_path / f"got-{n}"
        argv = _argv(inputs, out)
        for moment in kills:
            process = _start(argv)
            if moment == "writing":
                _kill_when(process, partial(_writing_a_token_file, out))
            else:
                time.sleep(moment)
                _kill_when(process, lambda: True)
            assert process.exitcode == -signal.SIGKILL, "the run ended before it was killed"
            _listed_files_are_whole(out)
        assert not out.exists() or tree_bytes(out) != expected  # the kills left work to do
        assert main(argv) == 0
        assert tree_bytes(out) == expected, kills
    capsys.readouterr()
