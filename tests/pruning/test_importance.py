"""One-shot importance (SPEC §10): a dominant structure is kept and a zeroed one dropped, for every
mask type and both data-free and activation scores; block influence of an identity layer is 0;
initial log_alpha follows the ranking."""

from __future__ import annotations

import pytest
import torch

from sheared.model import CausalLM, ModelArgs
from sheared.pruning import L0Module, TargetShape
from sheared.pruning import hard_concrete as hc
from sheared.pruning.importance import (
    activation_stats,
    initial_log_alpha,
    magnitude_scores,
    random_scores,
    row_ranks,
    select_masks,
    structure_shapes,
)
from sheared.pruning.target import mask_specs

# 4 layers, hidden 32, 6 query heads in 2 KV groups (r = 3), head_dim 8, intermediate 24.
ARGS = ModelArgs(
    family="llama",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
)
TARGET = TargetShape(
    num_hidden_layers=2, hidden_size=24, num_attention_heads=2, num_key_value_heads=1, intermediate_size=12
)
D = ARGS.head_dim


def _model(seed: int = 0) -> CausalLM:
    model = CausalLM(ARGS)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.3)  # peaked attention, clear signals
    return model.eval()


def _batches(num: int = 6, seq: int = 32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, ARGS.vocab_size, (1, seq), generator=g), True) for _ in range(num)]


def _activation(model: CausalLM):
    return activation_stats(model, ARGS, _batches()).scores(ARGS)


def _scores(method: str, model: CausalLM):
    return _activation(model) if method == "activation" else magnitude_scores(model, ARGS)


@torch.no_grad()
def _shape_structures(model: CausalLM, method: str) -> None:
    """Make one structure of every type dominant and one zeroed (layer 1 is the dominant layer)."""
    layers = model.model.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.v_proj.weight[D : 2 * D] *= 10  # KV group 1 dominant ...
        attn.v_proj.weight[:D] = 0  # ... group 0 silent: its heads output 0
        if method == "activation":
            attn.q_proj.weight[4 * D : 5 * D] *= 20  # head 1 of group 1 (query head 4) attends sharply
            attn.q_proj.weight[5 * D : 6 * D] = 0  # head 2 of group 1 attends uniformly: an average
        else:
            attn.q_proj.weight[4 * D : 5 * D] *= 10
            attn.o_proj.weight[:, 4 * D : 5 * D] *= 10
            attn.q_proj.weight[5 * D : 6 * D] = 0
            attn.o_proj.weight[:, 5 * D : 6 * D] = 0
        mlp.up_proj.weight[3] *= 10  # channel 3 dominant
        mlp.gate_proj.weight[3] *= 10
        mlp.up_proj.weight[7] = 0  # channel 7 silent
        mlp.gate_proj.weight[7] = 0
        mlp.down_proj.weight[:, 7] = 0
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight[5] = 10.0  # hidden dim 5 dominant
            norm.weight[9] = 0.0  # hidden dim 9 silent
    model.model.embed_tokens.weight[:, 5] *= 10
    model.model.embed_tokens.weight[:, 9] = 0
    if method == "magnitude":  # every weight reading or writing hidden dims 5 and 9
        for layer in layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.weight[:, 5] *= 10
                m.weight[:, 9] = 0
            for m in (layer.mlp.gate_proj, layer.mlp.up_proj):
                m.weight[:, 5] *= 10
                m.weight[:, 9] = 0
            for m in (layer.self_attn.o_proj, layer.mlp.down_proj):
                m.weight[5] *= 10
                m.weight[9] = 0
    for i, layer in enumerate(layers):  # layer 1 dominant, layer 2 an identity
        scale = 10.0 if i == 1 else 0.0 if i == 2 else 1.0
        layer.self_attn.o_proj.weight *= scale
        layer.mlp.down_proj.weight *= scale


@pytest.mark.parametrize("method", ["activation", "magnitude"])
def test_dominant_structures_are_kept_and_zeroed_ones_dropped(method):
    model = _model()
    _shape_structures(model, method)
    scores = _scores(method, model)
    masks = select_masks(scores, mask_specs(ARGS, TARGET))
    assert masks.layer[1] == 1 and masks.layer[2] == 0
    assert masks.kv_group[:, 1].tolist() == [1.0] * 4 and masks.kv_group[:, 0].tolist() == [0.0] * 4
    # inside group 1 (2 of 3 heads kept): head 1 (query head 4) kept, head 2 (zeroed) last
    assert row_ranks(scores["head"][:, 1])[:, 2].tolist() == [2] * 4
    assert masks.head[:, 1, 1].tolist() == [1.0] * 4 and masks.head[:, 1, 2].tolist() == [0.0] * 4
    assert masks.intermediate[:, 3].tolist() == [1.0] * 4 and masks.intermediate[:, 7].tolist() == [0.0] * 4
    assert row_ranks(scores["intermediate"])[:, 7].tolist() == [ARGS.intermediate_size - 1] * 4
    assert masks.hidden[5] == 1 and masks.hidden[9] == 0
    assert row_ranks(scores["hidden"])[9] == ARGS.hidden_size - 1


def test_identity_layer_has_zero_block_influence_and_goes_first():
    model = _model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    layer = _activation(model)["layer"]
    assert layer[2].item() == pytest.approx(0.0, abs=1e-6)
    assert layer[[0, 1, 3]].min() > 1e-3
    one = select_masks({"layer": layer}, [s for s in mask_specs(ARGS, TARGET) if s.name == "layer"])
    three = TargetShape(3, 32, 6, 2, 24)
    (spec,) = mask_specs(ARGS, three)
    assert select_masks({"layer": layer}, [spec]).layer.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert one.layer[2] == 0


@pytest.mark.parametrize("method", ["activation", "magnitude", "random"])
def test_masks_keep_exact_target_counts_per_row(method):
    model = _model()
    scores = random_scores(ARGS, seed=3) if method == "random" else _scores(method, model)
    assert {k: tuple(v.shape) for k, v in scores.items()} == structure_shapes(ARGS)
    specs = mask_specs(ARGS, TARGET)
    masks = select_masks(scores, specs)
    for spec in specs:
        kept = getattr(masks, spec.name).sum(-1)
        assert torch.all(kept == spec.target_kept), spec.name


def test_random_scores_are_seeded():
    a, b, c = random_scores(ARGS, 1), random_scores(ARGS, 1), random_scores(ARGS, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["intermediate"], c["intermediate"])


def test_uncounted_passes_add_nothing():
    model = _model()
    counted = activation_stats(model, ARGS, _batches(3)).tensors()
    padded = activation_stats(model, ARGS, [*_batches(3), (_batches(1)[0][0], False)]).tensors()
    assert all(torch.equal(a, b) for a, b in zip(counted, padded))


def test_head_score_is_the_summed_norm_of_head_outputs():
    """SPEC §10 on one layer: Σ_tokens ‖o_h‖₂ equals a direct computation from o_proj's input."""
    model = _model()
    seen = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    batches = _batches(2)
    stats = activation_stats(model, ARGS, batches)
    handle.remove()
    direct = sum(x.unflatten(-1, (6, D)).norm(dim=-1).sum((0, 1)).double() for x in seen)
    torch.testing.assert_close(stats.head[0], direct, rtol=1e-6, atol=0)
    assert stats.tokens.item() == 2 * 32


def test_initial_log_alpha_follows_the_ranking_and_keeps_everything():
    model = _model()
    scores = _activation(model)
    l0 = L0Module(ARGS, TARGET)
    l0.reset_parameters_from_scores(scores)
    l0.clamp_()
    for name, spec in l0.specs.items():
        la = l0.log_alpha[name].detach()
        assert torch.equal(row_ranks(la), row_ranks(scores[name])), name  # same order in every row
        # the one-shot method's kept set is exactly the top of every row
        assert torch.equal(hc.top_k_binary(la, spec.target_kept), select_masks(scores, [spec]).__dict__[name])
        assert hc.score(la).min() >= 0.98, name  # P(z != 0) at step 0: everything (almost surely) kept
    torch.testing.assert_close(
        initial_log_alpha(torch.tensor([[0.3, 0.9, 0.1, 0.5]]), 2),
        torch.tensor([[3.5, hc.LOG_ALPHA_MAX, 2.5, 4.0]]),
    )
