"""A full disk or a read-only folder during every kind of write, on a real small tmpfs: a checkpoint, an HF
export, a GGUF export and `data prepare` each end in one line naming the path and the space needed (or
that the folder is read-only), leave no temporary file or folder, and keep the previous artefact byte for
byte. Mounting needs root; where it fails (CI without privileges) these tests skip and say why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_bytes

from sheared.cli import main
from sheared.data.prepare import DomainInput, PrepareConfig, prepare_data
from sheared.errors import UserError
from sheared.files import DiskError, atomic_write_json
from sheared.train.checkpoint import save_checkpoint

MiB = 2**20
KiB = 2**10
TEMPORARY = (".tmp", ".export-tmp")


@pytest.fixture(scope="session")
def tmpfs_problem(tmp_path_factory) -> str | None:
    """Why a small tmpfs cannot be mounted here, or None: tried once per session."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount command"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = tmp_path_factory.mktemp("tmpfs-probe")
    tried = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True
    )
    if tried.returncode != 0:
        return f"`mount -t tmpfs` failed: {tried.stderr.strip() or tried.returncode}"
    subprocess.run(["umount", str(probe)], check=True)
    return None


@pytest.fixture
def small_disk(tmpfs_problem, tmp_path):
    """`small_disk(size_bytes)`: a fresh tmpfs of that size under the test's folder, unmounted after."""
    if tmpfs_problem is not None:
        pytest.skip(f"needs a small tmpfs to fill: {tmpfs_problem}")
    mounted = []

    def mount(size: int):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(
                ["umount", "-l", str(path)], check=False
            )  # still busy: detach it now, free it later


def read_only(disk) -> None:
    """Remount a tmpfs read-only (root ignores file permissions, so chmod would not stop a write)."""
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def fill(disk, leave: int) -> None:
    """Fill `disk` with a filler file until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(bytes(max(0, free - leave)))


def leftovers(root) -> list[str]:
    """Temporary files or folders left under `root`."""
    return [str(p) for p in root.rglob("*") if p.name.endswith(TEMPORARY)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sheared: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_json_file_on_a_full_disk_keeps_the_previous_one(small_disk):
    disk = small_disk(64 * KiB)
    atomic_write_json(disk / "results.json", {"old": 1})
    fill(disk, leave=0)
    before = tree_bytes(disk)
    big = {"values": list(range(20_000))}
    needed = len(json.dumps(big, indent=2).encode()) + 1
    with pytest.raises(DiskError) as e:
        atomic_write_json(disk / "results.json", big)
    assert str(e.value) == (
        f"cannot write {disk / 'results.json'}: No space left on device (0.0 KiB free, about "
        f"{needed / KiB:,.1f} KiB needed); nothing was replaced; free some space and run it again"
    )
    assert tree_bytes(disk) == before and leftovers(disk) == []


def _module_and_optimizer():
    torch.manual_seed(0)
    module = torch.nn.Linear(128, 128)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 128)).sum().backward()
    optimizer.step()  # AdamW's two moments per parameter: a checkpoint holds 3 × 16,512 float32
    return module, optimizer


def test_a_checkpoint_on_a_full_disk_and_a_read_only_run_directory(small_disk):
    module, optimizer = _module_and_optimizer()
    disk = small_disk(1 * MiB)
    save_checkpoint(disk / "run", 1, module, optimizer, {"step": 1}, keep=2)
    fill(disk, leave=64 * KiB)
    before = tree_bytes(disk)
    assert "run/checkpoints/step_000001/trainer_state.json" in before
    with pytest.raises(DiskError) as e:  # torch's zip writer: "unexpected pos", wrapped per rank by DCP
        save_checkpoint(disk / "run", 2, module, optimizer, {"step": 2}, keep=2)
    needed = 3 * (128 * 128 + 128) * 4
    step_2 = disk / "run" / "checkpoints" / "step_000002"
    message = str(e.value)
    assert message.startswith(f"cannot write the checkpoint {step_2}: No space left on device (")
    assert message.endswith(
        f"KiB free, about {needed / KiB:,.1f} KiB needed); nothing was replaced; free some space and "
        "continue with --resume"
    )
    assert tree_bytes(disk) == before and leftovers(disk) == []

    read_only(disk)
    with pytest.raises(DiskError) as e:
        save_checkpoint(disk / "run", 2, module, optimizer, {"step": 2}, keep=2)
    assert str(e.value) == (
        f"cannot write the checkpoint {step_2}: Read-only file system; nothing was replaced; make the run "
        "directory writable and continue with --resume"
    )
    assert tree_bytes(disk) == before


def _export_bytes(export) -> int:
    return sum(p.stat().st_size for p in export.iterdir())


def test_an_hf_export_on_a_full_disk(small_disk, tiny_export, capsys):
    run = tiny_export.parent / "run"
    disk = small_disk(_export_bytes(tiny_export) + 4 * MiB)
    shutil.copytree(tiny_export, disk / "export")
    fill(disk, leave=2 * MiB)
    before = tree_bytes(disk)
    # safetensors' Rust writer: "SafetensorError: ... No space left on device (os error 28)"
    assert main(["export", str(run), "--out", str(disk / "export"), "--force"]) == 2
    err = one_line(capsys)
    assert f"cannot write the export to {disk} (No space left on device); it needs about " in err
    assert err.endswith("nothing was replaced")
    assert tree_bytes(disk) == before and leftovers(disk) == []


def test_a_gguf_export_on_a_full_disk_and_onto_a_read_only_folder(small_disk, tiny_export, capsys):
    disk = small_disk(_export_bytes(tiny_export) + 4 * MiB)
    export = disk / "export"
    shutil.copytree(tiny_export, export)
    fill(disk, leave=2 * MiB)
    before = tree_bytes(disk)
    # numpy's tofile inside gguf's writer: "OSError: N requested and M written", no errno
    assert main(["export", str(export), "--gguf-type", "f32"]) == 2
    err = one_line(capsys)
    found = re.fullmatch(
        rf"sheared: error: cannot write {export / 'model-f32.gguf'}: No space left on device \(([\d.]+) MiB free, "
        r"about ([\d.]+) MiB needed\); nothing was replaced; free some space and run it again",
        err,
    )
    assert found is not None, err
    params = json.loads((export / "export_report.json").read_text())["exported_num_params"]
    assert float(found[2]) == round(params * 4 / MiB, 1)  # f32: 4 bytes a weight
    assert abs(float(found[1]) - 2.0) < 0.1  # the partial file is gone: the space it took is free again
    assert tree_bytes(disk) == before and leftovers(disk) == []

    read_only(disk)
    assert main(["export", str(export), "--gguf-type", "f16"]) == 2
    assert one_line(capsys) == (
        f"sheared: error: cannot write {export / 'model-f16.gguf'}: Read-only file system; nothing was "
        "replaced; choose a writable folder"
    )
    assert tree_bytes(disk) == before


# --- data prepare -------------------------------------------------------------------------------------


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>"
    ), words


def _corpus(folder, name: str, documents: int, words: list[str]) -> str:
    rng = np.random.default_rng(len(name) + documents)
    path = folder / f"{name}.jsonl"
    with path.open("w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 50))}) + "\n")
    return str(path)


def test_data_prepare_on_a_full_disk_and_a_read_only_folder(small_disk, tmp_path):
    tokenizer, words = _word_tokenizer()
    inputs = {"a": _corpus(tmp_path, "a", 20, words), "b": _corpus(tmp_path, "b", 2000, words)}
    disk = small_disk(1 * MiB)
    out = disk / "prepared"

    def prepare(*names):
        domains = {n: DomainInput([inputs[n]]) for n in names}
        cfg = PrepareConfig(out_dir=str(out), domains=domains, seq_len=16, eval_sequences=2, num_workers=1)
        return prepare_data(cfg, tokenizer, progress=False)

    prepare("a")
    fill(disk, leave=0)
    before = tree_bytes(disk)
    with pytest.raises(DiskError) as e:  # the tokenizer folder (tokenizers' Rust: "os error 28")
        prepare("a", "b")
    assert str(e.value).startswith(f"cannot write {out / 'tokenizer'}: No space left on device (0.0 KiB free")
    assert tree_bytes(disk) == before and leftovers(disk) == []

    (disk / "filler").unlink()
    fill(disk, leave=64 * KiB)  # the tokenizer fits, b's 100,000 tokens do not
    before = tree_bytes(disk)
    with pytest.raises(DiskError) as e:
        prepare("a", "b")
    texts = [json.loads(line)["text"] for line in Path(inputs["b"]).read_text().splitlines()]
    bound = sum(len(t.encode()) + 2 for t in texts) * 2  # uint16: at most a token per byte, plus BOS and end
    message = str(e.value)
    assert message.startswith(
        f"cannot write the token files of domain 'b' in {out}: No space left on device ("
    )
    assert message.endswith(
        f"KiB free, up to {bound / KiB:,.1f} KiB needed); nothing was replaced; free some space and run it again"
    )
    assert tree_bytes(disk) == before and leftovers(disk) == []

    read_only(disk)
    with pytest.raises(DiskError) as e:
        prepare("a", "b")
    assert str(e.value) == (
        f"cannot write {out / 'tokenizer'}: Read-only file system; nothing was replaced; choose a writable folder"
    )
    with pytest.raises(UserError, match=f"cannot write {disk / 'new'}: Read-only file system"):
        out = disk / "new"
        prepare("a")
    assert tree_bytes(disk) == before
