"""Hard concrete maths: golden P(z = 0), sampling statistics, deterministic top-k."""

import math

import pytest
import torch

from sheared.pruning import hard_concrete as hc


def test_golden_probability_of_zero():
    # SPEC §2: log_alpha = 4.605, 0, -2, -4.605 -> P(z = 0) = 0.0020, 0.168, 0.599, 0.953
    log_alpha = torch.tensor([4.605, 0.0, -2.0, -4.605])
    expected = torch.tensor([0.0020, 0.168, 0.599, 0.953])
    torch.testing.assert_close(hc.prob_zero(log_alpha), expected, atol=5e-4, rtol=0)


def test_constants_are_the_papers():
    assert (hc.BETA, hc.LIMIT_LEFT, hc.LIMIT_RIGHT, hc.EPS) == (2 / 3, -0.1, 1.1, 1e-6)
    assert (
        pytest.approx(math.log(0.01)) == hc.LOG_ALPHA_MIN and pytest.approx(math.log(100)) == hc.LOG_ALPHA_MAX
    )


@pytest.mark.parametrize("log_alpha", [4.605, 0.0, -2.0])
def test_empirical_zero_rate_matches_score(log_alpha):
    n = 200_000
    la = torch.full((n,), log_alpha)
    z = hc.sample(la, hc.uniform_noise((n,), torch.Generator().manual_seed(0)))
    assert z.min() >= 0 and z.max() <= 1
    p = hc.prob_zero(torch.tensor(log_alpha)).item()
    assert (z == 0).float().mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-4)


def test_sample_is_differentiable_in_log_alpha():
    la = torch.zeros(1000, requires_grad=True)
    hc.sample(la, hc.uniform_noise((1000,), torch.Generator().manual_seed(1))).sum().backward()
    assert la.grad.abs().sum() > 0


def test_top_k_binary_per_row():
    la = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    assert hc.top_k_binary(la, 2).tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]
    assert hc.top_k_binary(la, torch.tensor([1, 3])).tolist() == [[0, 1, 0, 0], [1, 1, 1, 0]]
