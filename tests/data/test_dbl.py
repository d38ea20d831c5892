"""Dynamic batch loading: the weight update and the scaling-law reference losses (SPEC §5)."""

import json
import re

import numpy as np
import pytest

from sheared.data import fit_reference_losses, update_domain_weights
from sheared.data.dbl import read_reference_losses, weights_by_domain, weights_proportional_to
from sheared.errors import UserError

# SPEC §5: LLaMA2 7B / 13B / 70B losses per RedPajama domain, predicted at 1.3B.
LLAMA2_SIZES = [6_738_415_616, 13_015_864_320, 68_976_648_192]
LLAMA2_LOSSES = {
    "cc": [1.7520, 1.6680, 1.4621],
    "github": [0.6216, 0.5791, 0.4890],
    "book": [1.9063, 1.8242, 1.6450],
    "stackexchange": [1.4482, 1.3936, 1.2805],
    "wiki": [1.4844, 1.3945, 1.2118],
    "arxiv": [1.2637, 1.2109, 1.1148],
    "c4": [1.9219, 1.8486, 1.6848],
}
GOLDEN_1_3B = {
    "cc": 1.9643,
    "github": 0.7459,
    "book": 2.1393,
    "stackexchange": 1.6117,
    "wiki": 1.7590,
    "arxiv": 1.4449,
    "c4": 2.1251,
}


def test_scaling_law_golden_values():
    predicted = fit_reference_losses(LLAMA2_SIZES, LLAMA2_LOSSES, 1_345_423_360)
    assert predicted.keys() == GOLDEN_1_3B.keys()
    for domain, value in GOLDEN_1_3B.items():
        assert predicted[domain] == pytest.approx(value, abs=1e-3), domain
        assert isinstance(predicted[domain], float)


def test_scaling_law_recovers_a_known_curve_from_more_points():
    sizes = [1e8, 3e8, 1e9, 3e9, 1e10]
    losses = [50.0 / n**0.2 + 1.5 for n in sizes]
    assert fit_reference_losses(sizes, {"x": losses}, 5e8)["x"] == pytest.approx(
        50.0 / 5e8**0.2 + 1.5, abs=1e-6
    )


# Hand computation: w = (.5, .3, .2), losses (2.0, 1.5, 3.0), reference (1.8, 1.7, 2.5), eta 1, c 1e-4.
# clipped:   delta = (.2, 0, .5)   -> a ∝ (.5 e^.2, .3, .2 e^.5) = (.610701, .3, .329744) / 1.240446
# unclipped: delta = (.2, -.2, .5) -> a ∝ (.610701, .3 e^-.2 = .245619, .329744) / 1.186065
# then w = (1 - c) a + c / 3.
@pytest.mark.parametrize(
    ("clip", "expected"),
    [
        (True, [0.4923082808, 0.2418577164, 0.2658340028]),
        (False, [0.5148789628, 0.2071001409, 0.2780208963]),
    ],
)
def test_three_domain_update_by_hand(clip, expected):
    new = update_domain_weights([0.5, 0.3, 0.2], [2.0, 1.5, 3.0], [1.8, 1.7, 2.5], clip_excess=clip)
    assert new == pytest.approx(expected, abs=1e-9)


def test_no_excess_keeps_weights_up_to_smoothing():
    w = [0.7, 0.2, 0.1]
    new = update_domain_weights(w, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert new == pytest.approx([(1 - 1e-4) * x + 1e-4 / 3 for x in w], abs=1e-12)


def test_weights_sum_to_one_and_respect_the_floor():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 9))
        w = rng.dirichlet(np.full(k, 0.3))
        losses = rng.uniform(0, 10, k)
        reference = rng.uniform(0, 10, k)
        smoothing = float(rng.choice([1e-4, 1e-2, 0.0]))
        new = update_domain_weights(
            w.tolist(),
            losses.tolist(),
            reference.tolist(),
            eta=float(rng.uniform(0.1, 5)),
            smoothing=smoothing,
            clip_excess=bool(rng.integers(2)),
        )
        assert sum(new) == pytest.approx(1.0, abs=1e-12)
        assert min(new) >= smoothing / k * (1 - 1e-9)
    # A domain far behind its reference takes almost everything; the others keep the floor.
    new = update_domain_weights([0.25] * 4, [100.0, 1.0, 1.0, 1.0], [1.0] * 4)
    assert new[0] == pytest.approx(1 - 3e-4 / 4, abs=1e-9)
    assert new[1:] == pytest.approx([1e-4 / 4] * 3, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weights=[0.5, 0.6]), "must sum to 1"),
        (dict(weights=[1.5, -0.5]), "finite and non-negative"),
        (dict(losses=[1.0]), "losses have 1 entries for 2"),
        (dict(losses=[1.0, float("nan")]), "losses must be finite"),
        (dict(eta=0.0), "eta must be a positive number"),
        (dict(smoothing=1.0), r"smoothing must be in \[0, 1\)"),
    ],
)
def test_update_validates_inputs(kwargs, message):
    args = dict(weights=[0.5, 0.5], losses=[1.0, 2.0], reference=[1.0, 1.0])
    args.update(kwargs)
    with pytest.raises(UserError, match=message):
        update_domain_weights(args.pop("weights"), args.pop("losses"), args.pop("reference"), **args)


def test_weights_by_domain():
    assert weights_by_domain({"b": 0.25, "a": 0.75}, ["a", "b"]) == [0.75, 0.25]
    with pytest.raises(UserError, match=r"unknown domain 'wiki'; the data has: a, b"):
        weights_by_domain({"a": 0.5, "wiki": 0.5}, ["a", "b"])
    with pytest.raises(UserError, match=r"lack domain 'b'"):
        weights_by_domain({"a": 1.0}, ["a", "b"])
    with pytest.raises(UserError, match=r"must sum to 1, got 0.9"):
        weights_by_domain({"a": 0.5, "b": 0.4}, ["a", "b"])
    with pytest.raises(UserError, match=r"non-negative"):
        weights_by_domain({"a": 1.2, "b": -0.2}, ["a", "b"])
    assert weights_proportional_to([30, 10]) == [0.75, 0.25]


# ------------------------------------------------------------------------------------------------
# Reference losses as the user gives them (`data.reference_losses`).
# ------------------------------------------------------------------------------------------------

AB = ["a", "b"]


def test_reference_losses_from_a_mapping_in_domain_order():
    losses = read_reference_losses({"b": 2, "a": 1.5}, AB, {})
    assert list(losses.items()) == [("a", 1.5), ("b", 2.0)]
    assert all(type(value) is float for value in losses.values())


def test_reference_losses_from_json_files(tmp_path):
    written = tmp_path / "ref.json"  # as `sheared data reference-loss` writes it
    written.write_text(json.dumps({"target_params": 5, "reference_losses": {"b": 3, "a": 1.25}}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"a": 0.75, "b": 0.5}))
    assert read_reference_losses(str(written), AB, {}) == {"a": 1.25, "b": 3.0}
    assert read_reference_losses(str(plain), AB, {}) == {"a": 0.75, "b": 0.5}


def test_reference_losses_source_reuses_the_pruning_run_or_asks_to_measure():
    assert read_reference_losses("source", AB, {}) is None
    assert read_reference_losses("source", AB, {"reference_losses": {"a": 1.0}}) is None  # lacks b
    previous = {"reference_losses": {"c": 9.0, "b": 2, "a": 1}}
    assert list(read_reference_losses("source", AB, previous).items()) == [("a", 1.0), ("b", 2.0)]


def test_reference_losses_refusals(tmp_path):
    def refused(spec, message):
        with pytest.raises(UserError, match=re.escape(message)):
            read_reference_losses(spec, AB, {})

    refused(
        {"a": 1, "b": 2, "c": 3},
        "reference losses in data.reference_losses: unknown domain 'c'; the data has: a, b",
    )
    refused(
        {"a": 1}, "reference losses in data.reference_losses: no value for domain 'b'; the data has: a, b"
    )
    missing = str(tmp_path / "nope.json")
    refused(missing, f"data.reference_losses {missing!r} is neither 'source' nor an existing JSON file")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"reference_losses": {"a": 1, "x": 2}}))
    refused(str(wrong), f"reference losses in {wrong}: unknown domain 'x'; the data has: a, b")
