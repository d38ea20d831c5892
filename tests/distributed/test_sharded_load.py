"""FSDP2 loading shard by shard: 2 processes reading only their rows of a multi-file safetensors
source end up with exactly the parameters of a single-process load."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import free_port, subprocess_env
from huggingface_hub import save_torch_state_dict

from sheared.model import CausalLM, ModelArgs, hf_config_from_args, load_source

pytestmark = pytest.mark.distributed


def _sharded_source(path) -> None:
    """A random llama (odd row counts, so the two shards differ in size) in several safetensors files."""
    args = ModelArgs(
        family="llama",
        vocab_size=101,
        hidden_size=48,
        intermediate_size=81,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        tie_word_embeddings=False,
    )
    model = CausalLM(args)
    model.init_weights(torch.Generator().manual_seed(3), std=0.3)
    path.mkdir()
    hf_config_from_args(args, {}).save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, path, max_shard_size="20KB")


def test_two_process_sharded_load_equals_a_single_process_load(tmp_path):
    source = tmp_path / "source"
    _sharded_source(source)
    assert len(list(source.glob("*.safetensors"))) > 3  # really several files
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "tests/distributed/sharded_load_worker.py",
        str(source),
        str(tmp_path / "gathered.pt"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "gathered.pt", weights_only=True)
    expected = load_source(source, with_tokenizer=False).model.state_dict()
    assert result["params"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(result["params"][name], value), name
    rows = result["local_rows"]
    assert rows[0]["lm_head.weight"] + rows[1]["lm_head.weight"] == 101  # each rank held only its share
    assert rows[0]["lm_head.weight"] == 51 and rows[1]["lm_head.weight"] == 50
