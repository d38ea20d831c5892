"""The hard concrete distribution (Louizos, Welling, Kingma 2018, "Learning Sparse Neural Networks
through L0 Regularization"), as used by structured pruning (SPEC §2).

A stretched, clamped binary concrete variable: z is exactly 0 or exactly 1 with positive
probability and continuous in between, so its expected L0 norm is differentiable in `log_alpha`.
"""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0  # temperature of the binary concrete (Louizos et al. 2018)
LIMIT_LEFT = -0.1  # stretch interval (l, r) = (-0.1, 1.1), Louizos et al. 2018
LIMIT_RIGHT = 1.1
EPS = 1e-6  # keeps u away from 0 and 1, and scores inside (0, 1)
LOG_ALPHA_INIT_MEAN = 5.0  # every structure starts kept: P(z = 0) ≈ 0.0014
LOG_ALPHA_INIT_STD = 0.01
LOG_ALPHA_MIN = math.log(0.01)  # log_alpha is clamped into [ln 0.01, ln 100] before each forward
# The projection controller's lower bound: P(z != 0) = 0.0045 there (0.047 at ln 0.01), so that the
# dropped structures of a row barely sample and do not push its kept ones below near-certainty (the
# expected sparsity counts every structure's P(z != 0); docs/method.md, "Landing on the target").
PROJECTION_LOG_ALPHA_MIN = -7.0
LOG_ALPHA_MAX = math.log(100.0)


def uniform_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """u ~ Uniform(eps, 1 - eps), float32, drawn on the CPU (device-independent streams)."""
    return EPS + (1.0 - 2.0 * EPS) * torch.rand(shape, generator=generator, dtype=torch.float32)


def sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hard concrete sample z in [0, 1] for noise u (same shape as log_alpha), differentiable in log_alpha."""
    s = torch.sigmoid((torch.log(u) - torch.log(1.0 - u) + log_alpha) / BETA)
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def score(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = 1 - sigmoid(beta * log(-l / r) - log_alpha), clamped to [eps, 1 - eps]."""
    return (1.0 - torch.sigmoid(BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT) - log_alpha)).clamp(EPS, 1.0 - EPS)


def prob_zero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z = 0)."""
    return 1.0 - score(log_alpha)


def top_k_binary(log_alpha: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Binary mask keeping, in every row (last dimension), the k entries with the largest log_alpha.

    Args:
        log_alpha: (..., n).
        k: kept count, an int for all rows or a tensor of shape (...) with one count per row.
    """
    n = log_alpha.shape[-1]
    k = torch.as_tensor(k, device=log_alpha.device).expand(log_alpha.shape[:-1]).clamp(0, n)
    ranks = log_alpha.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    return (ranks < k[..., None]).to(torch.float32)
