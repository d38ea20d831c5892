"""The domain mixture sampler: frequencies, determinism, resume, rank slices, epochs."""

import math
from collections import Counter

import pytest

from sheared.data import DomainMixtureSampler, rank_slice
from sheared.errors import UserError

DOMAINS = ["code", "books", "web"]


def make(weights=(0.5, 0.3, 0.2), sizes=(50, 7, 1000), seed=0):
    return DomainMixtureSampler(DOMAINS, list(sizes), list(weights), seed=seed)


def draw(sampler, steps, size=16):
    return [sampler.next_global_batch(size) for _ in range(steps)]


def test_frequencies_match_weights():
    weights = [0.5, 0.3, 0.2]
    counts = Counter(d for batch in draw(make(weights), 500, 32) for d, _ in batch)
    n = 500 * 32
    for d, p in enumerate(weights):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[d] / n - p) < 4 * sigma, (d, counts[d] / n, p)


def test_same_seed_same_stream_other_seed_other_stream():
    assert draw(make(seed=3), 20) == draw(make(seed=3), 20)
    assert draw(make(seed=3), 20) != draw(make(seed=4), 20)


def test_resume_continues_the_exact_stream():
    full = make()
    expected = draw(full, 7)
    full.set_weights([0.1, 0.1, 0.8])  # a DBL update between draws is part of the state
    expected += draw(full, 9)

    first = make()
    got = draw(first, 7)
    first.set_weights([0.1, 0.1, 0.8])
    got += draw(first, 2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    got += draw(resumed, 7)
    assert got == expected


def test_rank_slices_partition_the_global_batch():
    batch = make().next_global_batch(24)
    for world in (1, 2, 3, 4):
        # Each rank runs its own sampler with the same seed and keeps only its slice.
        slices = [rank_slice(make().next_global_batch(24), r, world) for r in range(world)]
        # Equal shares that, concatenated in rank order, are the single-process batch: a partition.
        assert [len(s) for s in slices] == [24 // world] * world
        assert [item for s in slices for item in s] == batch
    with pytest.raises(UserError, match="does not split over 5 ranks"):
        rank_slice(batch, 0, 5)


def test_wraps_around_with_a_fresh_shuffle_every_epoch():
    sampler = DomainMixtureSampler(["tiny"], [5], [1.0], seed=1)
    indices = [i for batch in draw(sampler, 10, 4) for _, i in batch]  # 40 draws = 8 epochs
    epochs = [indices[e * 5 : (e + 1) * 5] for e in range(8)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # the order is reshuffled
    assert sampler.state_dict()["epoch"] == [7] and sampler.state_dict()["position"] == [5]


def test_bad_weights_and_state_are_refused():
    with pytest.raises(UserError, match="must sum to 1"):
        make(weights=(0.5, 0.3, 0.3))
    with pytest.raises(UserError, match="non-negative"):
        make().set_weights([1.2, -0.1, -0.1])
    with pytest.raises(UserError, match="got 2 weights for 3 domains"):
        make().set_weights([0.5, 0.5])
    with pytest.raises(UserError, match="domain 'books' has no training sequences"):
        make(sizes=(5, 0, 5))
    other = DomainMixtureSampler(["a", "b", "c"], [50, 7, 1000], [0.5, 0.3, 0.2], seed=0)
    with pytest.raises(UserError, match="sampler state was saved with domains"):
        other.load_state_dict(make().state_dict())
