"""Unmasked parity with `transformers`: same weights, same logits (fp32, atol 1e-5)."""

import pytest
import torch
from helpers import ours_from_hf, tiny_hf_model, token_batch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama-mha": dict(family="llama", heads=6, kv_heads=6),
    "llama-gqa2": dict(family="llama", heads=6, kv_heads=3),
    "llama-gqa3": dict(family="llama", heads=6, kv_heads=2),
    "llama-tied": dict(family="llama", heads=6, kv_heads=2, tied=True),
    "llama3-rope": dict(family="llama", heads=6, kv_heads=2, rope_parameters=LLAMA3_ROPE),
    "llama-linear-rope": dict(
        family="llama",
        heads=4,
        kv_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    ),
    "mistral": dict(family="mistral", heads=6, kv_heads=2, sliding_window=None),
    "mistral-sliding": dict(family="mistral", heads=6, kv_heads=3, sliding_window=7),
    "qwen2-bias": dict(family="qwen2", heads=6, kv_heads=2),
    "qwen2-tied": dict(family="qwen2", heads=6, kv_heads=6, tied=True),
    "qwen3-qknorm": dict(family="qwen3", heads=6, kv_heads=3),
    "qwen3-tied-gqa3": dict(family="qwen3", heads=6, kv_heads=2, tied=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    hf = tiny_hf_model(**CASES[case])
    ours = ours_from_hf(hf)
    ids = token_batch(seq=24)
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    assert expected.std() > 0.5, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_family_features_are_present():
    # The cases above exercise what they claim: biases, q/k norms, tied weights, scaled RoPE.
    qwen2 = ours_from_hf(tiny_hf_model(**CASES["qwen2-bias"]))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.model.layers[0].self_attn.o_proj.bias is None
    qwen3 = ours_from_hf(tiny_hf_model(**CASES["qwen3-qknorm"]))
    assert qwen3.model.layers[0].self_attn.q_norm is not None
    tied = ours_from_hf(tiny_hf_model(**CASES["llama-tied"]))
    assert tied.lm_head is None and tied.output_weight is tied.model.embed_tokens.weight
    assert ours_from_hf(tiny_hf_model(**CASES["llama3-rope"])).args.rope_type == "llama3"


def test_llama3_rope_changes_logits():
    # Guards against the scaling being silently ignored: same weights, plain RoPE, other logits.
    scaled = tiny_hf_model(**CASES["llama3-rope"])
    plain = tiny_hf_model(
        family="llama", heads=6, kv_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    plain.load_state_dict(scaled.state_dict())
    ids = token_batch(seq=40)
    with torch.no_grad():
        diff = (ours_from_hf(scaled)(ids) - ours_from_hf(plain)(ids)).abs().max()
    assert diff > 1e-2


def test_sliding_window_changes_logits_beyond_window():
    model = ours_from_hf(tiny_hf_model(**CASES["mistral-sliding"]))
    ids = token_batch(seq=20)
    with torch.no_grad():
        windowed = model(ids)
        model.model.layers[0].self_attn.sliding_window = None
        model.model.layers[1].self_attn.sliding_window = None
        full = model(ids)
    torch.testing.assert_close(windowed[:, :7], full[:, :7], atol=1e-6, rtol=0)
    assert (windowed[:, 7:] - full[:, 7:]).abs().max() > 1e-3
