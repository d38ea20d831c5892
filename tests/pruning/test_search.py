"""Budget targets: candidate enumeration (complete, valid, within 1%), rule ranking, loss search."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from helpers import LLAMA2_7B, SMOLLM2, ours_from_hf, tiny_hf_model, token_batch

from sheared.errors import UserError
from sheared.export import export_model
from sheared.model import ModelArgs, Source, parameter_counts
from sheared.model.families import get_family
from sheared.pruning.importance import random_scores, select_masks
from sheared.pruning.search import BUDGET_TOLERANCE, rank_key, search_target, valid_shapes
from sheared.pruning.target import SHAPE_KEYS, TargetBudget, TargetShape, mask_specs, parse_count

QWEN2_SMALL = ModelArgs(  # q/k/v biases, untied, 2 query heads per KV group
    family="qwen2",
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    attention_bias=True,
)


def test_parse_count():
    assert parse_count("60M") == 60_000_000
    assert parse_count("1.3B") == 1_300_000_000
    assert parse_count("60_000_000") == 60_000_000
    assert parse_count("2.5k") == 2_500
    assert parse_count("6e7") == 60_000_000
    assert parse_count(60_000_000) == 60_000_000
    for bad in ("6x", "1.5", "0", "-3M", "M", True):
        with pytest.raises(UserError, match="params must be"):
            parse_count(bad)


def _amount(source: ModelArgs, budget: TargetBudget, shape: TargetShape) -> float:
    """The budget's quantity of a shape, computed here from the shape alone."""
    counts = parameter_counts(shape.model_args(source))
    if budget.params is not None:
        return counts["num_params"]
    if budget.params_fraction is not None:
        return counts["num_params_non_embedding"]
    return counts["num_params"] * {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[budget.dtype] / 1e6


def _goal(source: ModelArgs, budget: TargetBudget) -> float:
    if budget.params_fraction is not None:
        return budget.params_fraction * parameter_counts(source)["num_params_non_embedding"]
    return budget.params if budget.params is not None else budget.memory_mb


CASES = [
    (SMOLLM2, TargetBudget(params_fraction=0.5), 64),
    (SMOLLM2, TargetBudget(params="60M"), 64),
    (SMOLLM2, TargetBudget(memory_mb=100, dtype="bfloat16"), 64),
    (LLAMA2_7B, TargetBudget(params="2.7B"), 256),
    (QWEN2_SMALL, TargetBudget(memory_mb=0.5, dtype="int8"), 32),
]


@pytest.mark.parametrize(("source", "budget", "multiple"), CASES, ids=lambda v: getattr(v, "family", None))
def test_every_candidate_is_valid_and_within_one_percent(source, budget, multiple):
    search = search_target(source, budget, width_multiple=multiple)
    goal = _goal(source, budget)
    assert search.goal == pytest.approx(goal)
    assert len(search.ranked) > 3
    everything = valid_shapes(source, budget, multiple)
    assert len(everything) == search.num_valid and all(c in everything for c in search.ranked)
    source_shape = TargetShape(*(getattr(source, k) for k in SHAPE_KEYS))
    for c in everything:
        s = c.shape
        assert abs(_amount(source, budget, s) / goal - 1) <= BUDGET_TOLERANCE
        assert c.amount == pytest.approx(_amount(source, budget, s))
        assert s != source_shape
        assert all(getattr(s, k) <= getattr(source, k) for k in SHAPE_KEYS)
        assert s.heads_per_group <= source.heads_per_group
        for k in ("hidden_size", "intermediate_size"):
            assert getattr(s, k) % multiple == 0 or getattr(s, k) == getattr(source, k)
        assert mask_specs(source, s)  # accepted, and something is pruned
        assert s.model_args(source).head_dim == source.head_dim
    keys = [rank_key(c) for c in search.ranked]
    assert keys == sorted(keys)  # rule order
    assert len(
        {
            (c.shape.num_hidden_layers, c.shape.num_attention_heads, c.shape.num_key_value_heads)
            for c in search.ranked
        }
    ) == len(search.ranked)


def test_enumeration_is_complete():
    """The solved intermediate window finds exactly the shapes a brute force over every shape finds."""
    source = QWEN2_SMALL
    budget = TargetBudget(params_fraction=0.4)
    goal, w = _goal(source, budget), 32
    widths = lambda n: sorted({*range(w, n + 1, w), n})  # noqa: E731
    brute = set()
    for L, d, G, r, inter in itertools.product(
        range(1, 7), widths(256), range(1, 5), range(1, 3), widths(640)
    ):
        shape = TargetShape(L, d, G * r, G, inter)
        if (L, d, G * r, G, inter) != (6, 256, 8, 4, 640) and abs(
            _amount(source, budget, shape) / goal - 1
        ) <= 0.01:
            brute.add((L, d, G * r, G, inter))
    search = search_target(source, budget, width_multiple=w)
    assert search.num_valid == len(brute) == 33
    assert {
        (c.shape.num_hidden_layers, c.shape.num_attention_heads, c.shape.num_key_value_heads)
        for c in search.ranked
    } == {(L, H, G) for L, _, H, G, _ in brute}


def test_smollm2_half_rule_ranking_golden():
    search = search_target(SMOLLM2, TargetBudget(params_fraction=0.5))
    assert search.goal == 53_101_728  # half of SmolLM2's 106,203,456 non-embedding parameters
    assert (search.num_valid, len(search.ranked)) == (162, 96)
    first = search.ranked[0]
    assert first is search.chosen and search.ranking == "rule"
    assert first.shape == TargetShape(23, 448, 9, 3, 1216)
    assert first.num_params_non_embedding == 53_436_992 and first.num_params == 75_457_088
    assert first.imbalance == pytest.approx(math.log(30 / 23))  # heads kept; 23 of 30 layers the least kept
    assert [c.shape for c in search.ranked[1:3]] == [
        TargetShape(23, 512, 6, 2, 1152),
        TargetShape(24, 512, 6, 2, 1088),
    ]


def test_loss_search_measures_the_first_candidates_and_takes_the_lowest():
    measured = []

    def measure(shape: TargetShape) -> float:  # any function of the shape: deeper and narrower is better here
        measured.append(shape)
        return 10.0 - shape.num_hidden_layers / 10 + shape.hidden_size / 1000

    search = search_target(SMOLLM2, TargetBudget(params_fraction=0.5), num_candidates=5, measure=measure)
    assert measured == [c.shape for c in search.ranked[:5]]
    losses = [c.loss for c in search.ranked[:5]]
    assert all(c.loss is None for c in search.ranked[5:])
    assert search.ranking == "loss" and search.chosen.loss == min(losses)
    assert search.chosen.shape == TargetShape(24, 512, 6, 2, 1088)  # #3 by rule: the most layers of the five
    record = json.loads(json.dumps(search.to_json()))
    assert record["chosen"] == vars(search.chosen.shape) and len(record["candidates"]) == 96
    assert record["candidates"][0]["calibration_loss"] == pytest.approx(losses[0])


def test_ties_go_to_the_better_rule_rank():
    search = search_target(SMOLLM2, TargetBudget(params="60M"), num_candidates=4, measure=lambda s: 1.0)
    assert search.chosen is search.ranked[0]


@pytest.mark.parametrize(
    ("budget", "multiple", "message"),
    [
        (TargetBudget(params="200M"), 64, "is not below the source's 134,515,008 parameters"),
        (TargetBudget(memory_mb=540, dtype="float32"), 64, "is not below the source's 538.1 MB"),
        (
            TargetBudget(params="1M"),
            64,
            "below the smallest valid shape (1 layer, hidden 64, 1 query head in 1 KV group, intermediate 64: 3,174,592 parameters)",
        ),
        (TargetBudget(params_fraction=0.999), 64, "no valid shape lies within 1% of the budget"),
        (TargetBudget(params="60M"), 0, "width_multiple must be at least 1"),
    ],
)
def test_bad_budgets_are_refused(budget, multiple, message):
    with pytest.raises(UserError) as e:
        search_target(SMOLLM2, budget, width_multiple=multiple)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_budget_values_are_refused():
    with pytest.raises(
        UserError, match="exactly one of params, params_fraction or memory_mb, got params and memory_mb"
    ):
        TargetBudget(params="60M", memory_mb=100, dtype="int8")
    with pytest.raises(UserError, match="got none"):
        TargetBudget()
    with pytest.raises(UserError, match="memory_mb needs a dtype"):
        TargetBudget(memory_mb=100)
    with pytest.raises(UserError, match="applies to memory_mb only"):
        TargetBudget(params="60M", dtype="int8")
    with pytest.raises(UserError, match="between 0 and 1"):
        TargetBudget(params_fraction=1.0)


@pytest.mark.parametrize(("family", "count"), [("llama", 8), ("qwen2", 13)])
def test_candidates_export_with_random_masks(family, count, tmp_path):
    """Every candidate of a tiny HF source exports at its exact shape from a random-mask selection."""
    hf = tiny_hf_model(family=family, heads=6, kv_heads=3)  # 2 layers, hidden 48, intermediate 80
    model = ours_from_hf(hf)
    candidates = valid_shapes(model.args, TargetBudget(params_fraction=0.5), width_multiple=4)
    assert len(candidates) == count
    source = Source(
        model=model, tokenizer=None, family=get_family(family), hf_config=hf.config, path=tmp_path
    )
    for i, c in enumerate(candidates):
        masks = select_masks(random_scores(model.args, seed=i), mask_specs(model.args, c.shape))
        report = export_model(model, masks, tmp_path / f"out{i}", source=source, ids=token_batch(seq=12))
        assert report["verified"] and report["max_abs_logit_diff"] <= 1e-4
        assert report["exported_num_params"] == c.num_params
        config = json.loads((tmp_path / f"out{i}" / "config.json").read_text())
        assert tuple(config[k] for k in SHAPE_KEYS) == tuple(vars(c.shape).values())
