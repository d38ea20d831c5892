"""L0 module, target validation, the Lagrangian and expected parameter counts."""

import pytest
import torch
from helpers import LLAMA2_7B, ours_from_hf, tiny_hf_model, token_batch

from sheared.errors import UserError
from sheared.model import CausalLM, ModelArgs, args_from_hf_config, read_source_config
from sheared.pruning import L0Module, LagrangianConstraint, TargetShape
from sheared.pruning.compaction import kept_structure, slice_state_dict
from sheared.pruning.constraint import warmed_up_target
from sheared.pruning.params import expected_num_params
from sheared.pruning.target import mask_specs

# 4 layers, hidden 64, 8 query heads in 2 KV groups (r = 4), intermediate 96.
GQA_SOURCE = ModelArgs(
    family="llama",
    vocab_size=10,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
)


def test_llama2_7b_prunable_parameters_on_meta_device():
    with torch.device("meta"):
        model = CausalLM(LLAMA2_7B)
    prunable = sum(
        p.numel()
        for layer in model.model.layers
        for m in (layer.self_attn, layer.mlp)
        for p in m.parameters()
    )
    assert prunable == 6_476_005_376
    # With every score 1 the expected count is the full model: prunable + embeddings + norms.
    assert expected_num_params(LLAMA2_7B, {}).item() == model.num_params() == 6_738_415_616
    l0 = L0Module(LLAMA2_7B, TargetShape(24, 2048, 16, 16, 5504))
    ones = {name: torch.ones(spec.shape) for name, spec in l0.specs.items()}
    assert expected_num_params(LLAMA2_7B, ones).item() == 6_738_415_616


def test_mask_types_follow_the_target():
    src = GQA_SOURCE
    names = lambda t: [s.name for s in mask_specs(src, TargetShape(*t))]  # noqa: E731
    assert names((3, 48, 2, 1, 64)) == ["layer", "kv_group", "head", "intermediate", "hidden"]
    assert names((4, 64, 8, 2, 96)) == []
    assert names((4, 64, 4, 2, 96)) == ["head"]
    assert names((4, 64, 4, 1, 96)) == ["kv_group"]  # 4 heads in 1 group: r stays 4
    l0 = L0Module(src, TargetShape(3, 48, 2, 1, 64))
    assert {k: tuple(v.shape) for k, v in l0.log_alpha.items()} == {
        "layer": (4,),
        "kv_group": (4, 2),
        "head": (4, 2, 4),
        "intermediate": (4, 96),
        "hidden": (64,),
    }
    assert l0.target_sparsity() == pytest.approx(
        {"layer": 0.25, "kv_group": 0.5, "head": 0.5, "intermediate": 1 / 3, "hidden": 0.25}
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ((5, 64, 8, 2, 96), "num_hidden_layers=5 exceeds the source's 4"),
        ((4, 64, 8, 4, 96), "num_key_value_heads=4 exceeds the source's 2"),
        ((4, 64, 6, 1, 96), "6 query heads per KV group"),
        ((4, 64, 8, 2, 200), "intermediate_size=200 exceeds the source's 96"),
        ((0, 64, 8, 2, 96), "must be a positive integer"),
        ((4, 64, 7, 2, 96), "must be a multiple of num_key_value_heads"),
    ],
)
def test_target_validation(target, message):
    src = GQA_SOURCE
    with pytest.raises(UserError, match=message):
        mask_specs(src, TargetShape(*target))


def test_lambdas_ascend_and_raise_the_pressure():
    # One step with expected sparsity below target: gradient ascent moves lambda1 so that the
    # Lagrangian grows, and the gradient on log_alpha then pushes the scores down harder.
    src = ModelArgs(
        family="llama",
        vocab_size=10,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    l0 = L0Module(src, TargetShape(2, 16, 2, 2, 16))
    lag = LagrangianConstraint(l0.specs)
    opt = torch.optim.AdamW(
        [
            {"params": list(l0.parameters()), "lr": 0.1},
            {"params": list(lag.parameters()), "lr": 0.1, "maximize": True},
        ],
        weight_decay=0.0,
    )
    target = l0.target_sparsity()
    s_hat = l0.expected_sparsity()["intermediate"]
    assert (s_hat < target["intermediate"]).all()
    loss, _ = lag(l0.expected_sparsity(), target)
    loss.backward()
    grad_before = l0.log_alpha["intermediate"].grad.clone()
    assert grad_before.abs().max() == 0  # lambdas are 0: no pressure yet
    opt.step()
    opt.zero_grad()
    # gap < 0 so ascent drives lambda1 negative; lambda2 * gap^2 grows positive.
    assert lag.lambda1["intermediate"].item() < 0 and lag.lambda2["intermediate"].item() > 0
    loss, _ = lag(l0.expected_sparsity(), target)
    assert loss.item() > 0
    loss.backward()
    # d loss / d log_alpha > 0: descent lowers log_alpha, i.e. raises sparsity.
    assert (l0.log_alpha["intermediate"].grad > 0).all()


def test_warmup_of_the_target():
    assert warmed_up_target({"a": 0.5}, 0, 10) == {"a": 0.0}
    assert warmed_up_target({"a": 0.5}, 5, 10) == {"a": 0.25}
    assert warmed_up_target({"a": 0.5}, 50, 10) == {"a": 0.5}


def test_deterministic_masks_exact_and_expected_counts():
    src = GQA_SOURCE
    l0 = L0Module(src, TargetShape(3, 48, 2, 1, 64))
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    exact = l0.deterministic("target")
    assert exact.layer.sum() == 3 and exact.hidden.sum() == 48
    assert (exact.kv_group.sum(-1) == 1).all() and (exact.head.sum(-1) == 2).all()
    assert (exact.intermediate.sum(-1) == 64).all()
    expected = l0.deterministic("expected")
    for name, mask in expected.__dict__.items():
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        rows = torch.round(l0.scores()[name].sum(-1))
        assert torch.equal(mask.sum(-1), rows), name


SHAPES = {
    "llama-gqa-untied": dict(family="llama", heads=6, kv_heads=2),
    "llama-mha-tied": dict(family="llama", heads=6, kv_heads=6, tied=True),
    "qwen2-bias": dict(family="qwen2", heads=6, kv_heads=3),
    "qwen3-qknorm-tied": dict(family="qwen3", heads=6, kv_heads=2, tied=True),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_params_equal_sliced_params_for_binary_scores(case, seed):
    hf = tiny_hf_model(**SHAPES[case])
    args = args_from_hf_config(hf.config)
    l0 = L0Module(args, TargetShape(1, 1, 1, 1, 1))  # every mask type exists
    g = torch.Generator().manual_seed(seed)
    binary = {n: (torch.rand(p.shape, generator=g) < 0.6).float() for n, p in l0.log_alpha.items()}
    from sheared.model import Masks

    sliced = slice_state_dict(ours_from_hf(hf).state_dict(), args, kept_structure(args, Masks(**binary)))
    assert expected_num_params(args, binary).item() == sum(t.numel() for t in sliced.values())


def test_masked_forward_with_all_ones_is_bit_identical():
    model = ours_from_hf(tiny_hf_model(family="qwen3", heads=6, kv_heads=2))
    l0 = L0Module(model.args, TargetShape(1, 8, 1, 1, 8))
    ones = l0.deterministic("target")
    for name in ones.names():
        setattr(ones, name, torch.ones_like(getattr(ones, name)))
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, ones), model(ids))


def test_read_source_config_of_a_recipe_source():
    args, _, _ = read_source_config("configs/llama2-7b/source")
    assert args == LLAMA2_7B.replace(max_position_embeddings=4096, rms_norm_eps=1e-5)
