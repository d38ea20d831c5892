"""The domain mixture sampler: which sequence of which domain goes into every global batch.

The stream of global batches is a function of (seed, weights history, step) only:

- the domain of each of the B sequences of step s is drawn independently from the current
  weights with a generator seeded by (seed, s);
- inside a domain, sequences come in a shuffled order seeded by (seed, domain, epoch); when the
  domain runs out, the next epoch starts with a fresh shuffle (any number of epochs);
- a data-parallel rank takes a contiguous slice of every global batch (`rank_slice`), so one
  process with gradient accumulation and N processes see exactly the same sequences.

The state (`state_dict`) is tiny: the step, the weights and each domain's (epoch, position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sheared.data.dbl import validate_weights
from sheared.errors import UserError

# First words of the seed sequences, so the two kinds of random streams never coincide.
STREAM_DOMAIN_DRAWS = 0
STREAM_DOMAIN_ORDER = 1


class DomainMixtureSampler:
    """Draws global batches of (domain index, sequence index) pairs.

    Args:
        domains: domain names, in the order weights and results use.
        num_sequences: training sequences available per domain (each ≥ 1).
        weights: initial sampling weights per domain, summing to 1.
        seed: seed of every random draw.
    """

    def __init__(
        self, domains: Sequence[str], num_sequences: Sequence[int], weights: Sequence[float], seed: int
    ):
        if len(domains) != len(num_sequences) or not domains:
            raise UserError(
                f"need one sequence count per domain, got {len(num_sequences)} for {list(domains)}"
            )
        empty = [d for d, n in zip(domains, num_sequences) if n < 1]
        if empty:
            raise UserError(f"domain {empty[0]!r} has no training sequences")
        self.domains = list(domains)
        self.num_sequences = [int(n) for n in num_sequences]
        self.seed = int(seed)
        self.step = 0
        self._weights = self._checked(weights)
        self._epoch = [0] * len(domains)
        self._position = [0] * len(domains)
        self._orders: dict[int, np.ndarray] = {}  # domain -> permutation of the current epoch (a cache)

    def _checked(self, weights: Sequence[float]) -> list[float]:
        if len(weights) != len(self.domains):
            raise UserError(
                f"got {len(weights)} weights for {len(self.domains)} domains ({', '.join(self.domains)})"
            )
        return validate_weights(weights)

    @property
    def weights(self) -> list[float]:
        """Current sampling weights, aligned with `domains`."""
        return list(self._weights)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Change the weights used by the following draws (dynamic batch loading)."""
        self._weights = self._checked(weights)

    def _order(self, domain: int) -> np.ndarray:
        if domain not in self._orders:
            rng = np.random.default_rng([self.seed, STREAM_DOMAIN_ORDER, domain, self._epoch[domain]])
            self._orders[domain] = rng.permutation(self.num_sequences[domain])
        return self._orders[domain]

    def _take(self, domain: int) -> int:
        if self._position[domain] == self.num_sequences[domain]:  # out of data: next epoch, new shuffle
            self._epoch[domain] += 1
            self._position[domain] = 0
            self._orders.pop(domain, None)
        index = int(self._order(domain)[self._position[domain]])
        self._position[domain] += 1
        return index

    def next_global_batch(self, size: int) -> list[tuple[int, int]]:
        """The next global batch: `size` (domain index, sequence index) pairs; advances the step."""
        rng = np.random.default_rng([self.seed, STREAM_DOMAIN_DRAWS, self.step])
        p = np.asarray(self._weights, dtype=np.float64)
        draws = rng.choice(len(self.domains), size=size, p=p / p.sum())
        self.step += 1
        return [(int(d), self._take(int(d))) for d in draws]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same stream."""
        return {
            "domains": list(self.domains),
            "num_sequences": list(self.num_sequences),
            "seed": self.seed,
            "step": self.step,
            "weights": list(self._weights),
            "epoch": list(self._epoch),
            "position": list(self._position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; refuses one made for other domains, sizes or seed."""
        for key in ("domains", "num_sequences", "seed"):
            mine = getattr(self, key)
            if state[key] != mine:
                raise UserError(
                    f"sampler state was saved with {key}={state[key]}, but this data has {key}={mine}"
                )
        self.step = int(state["step"])
        self._weights = self._checked(state["weights"])
        self._epoch = [int(e) for e in state["epoch"]]
        self._position = [int(p) for p in state["position"]]
        self._orders.clear()


def rank_slice(batch: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank `rank`'s contiguous share of a global batch (its size must divide evenly)."""
    if len(batch) % world_size:
        raise UserError(f"global batch of {len(batch)} sequences does not split over {world_size} ranks")
    share = len(batch) // world_size
    return list(batch[rank * share : (rank + 1) * share])
