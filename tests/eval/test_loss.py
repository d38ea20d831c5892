"""The fused chunked loss equals the plain one: values and gradients, CE, KD, top-k, ties, bf16."""

import pytest
import torch
import torch.nn.functional as F

from sheared.eval.lm import IGNORE_INDEX, next_token_loss
from sheared.eval.loss import fused_loss, next_token_labels, unfused_loss

N, V, D, D_TEACHER = 30, 97, 16, 24
TOL = 1e-5
NUM_IGNORED = 5
CHUNK_SIZES = [1, 7, N, N + 13]  # 7 does not divide 30; N + 13 is one chunk larger than N
CASES = {
    "ce": dict(alpha=0.0),
    "kd": dict(alpha=1.0),
    "mixed": dict(alpha=0.3, temperature=2.0),
    "top_k": dict(alpha=0.5, temperature=1.5, top_k=5),
    "ce_logging_kd": dict(alpha=0.0, temperature=2.0),  # a teacher with alpha 0: KD logged, not trained
}


def _inputs(seed=0, dtype=torch.float32):
    """Student (N, D) / (V, D) and teacher (N, D_TEACHER) / (V, D_TEACHER), labels with NUM_IGNORED -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 2
    weight = torch.randn(V, D, generator=g) / D**0.5
    teacher_hidden = torch.randn(N, D_TEACHER, generator=g) * 2
    teacher_weight = torch.randn(V, D_TEACHER, generator=g) / D_TEACHER**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:NUM_IGNORED]] = IGNORE_INDEX
    return hidden.to(dtype), weight.to(dtype), labels, teacher_hidden.to(dtype), teacher_weight.to(dtype)


def _loss_and_grads(fn, case, chunk_size=None, seed=0, dtype=torch.float32, **extra):
    hidden, weight, labels, teacher_hidden, teacher_weight = _inputs(seed, dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    teacher = {} if case == "ce" else dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    parts = fn(hidden, weight, labels, **teacher, **CASES[case], chunk_size=chunk_size, **extra)
    parts.loss.backward()
    return parts, hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused_values_and_gradients(case, chunk_size):
    fused, grad_h, grad_w = _loss_and_grads(fused_loss, case, chunk_size)
    ref, ref_grad_h, ref_grad_w = _loss_and_grads(unfused_loss, case)
    assert ref.loss.item() > 1.0  # a real loss, not a degenerate 0
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(grad_h, ref_grad_h, atol=TOL, rtol=TOL)
    torch.testing.assert_close(grad_w, ref_grad_w, atol=TOL, rtol=TOL)
    assert grad_w.abs().max() > 1e-3  # the comparison is not between two zero tensors
    assert fused.num_predicted.item() == N - NUM_IGNORED


def test_kd_terms_are_weighted_by_alpha_and_temperature_squared():
    parts, _, _ = _loss_and_grads(fused_loss, "mixed", 7)
    assert parts.kd.item() > 0.01
    want = 0.7 * parts.ce + 0.3 * 2.0**2 * parts.kd
    torch.testing.assert_close(parts.loss.detach(), want, atol=TOL, rtol=TOL)


def test_large_logits_do_not_overflow():
    hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
    large = 100.0  # logits in the hundreds: exp would overflow float32 without the max shift
    results = [
        fn(
            hidden * large,
            weight,
            labels,
            teacher_hidden=teacher_hidden * large,
            teacher_weight=teacher_weight,
            alpha=0.5,
            temperature=2.0,
            chunk_size=7,
        )
        for fn in (fused_loss, unfused_loss)
    ]
    assert torch.isfinite(results[0].loss)
    assert results[1].loss.item() > 100.0
    torch.testing.assert_close(results[0].loss, results[1].loss, atol=1e-3, rtol=TOL)


def test_top_k_of_all_tokens_is_the_full_kl():
    full, grad_h, grad_w = _loss_and_grads(fused_loss, "mixed", 7)
    top_all, top_grad_h, top_grad_w = _loss_and_grads(fused_loss, "mixed", 7, top_k=V)
    torch.testing.assert_close(top_all.kd, full.kd, atol=TOL, rtol=TOL)
    torch.testing.assert_close(top_grad_h, grad_h, atol=TOL, rtol=TOL)
    torch.testing.assert_close(top_grad_w, grad_w, atol=TOL, rtol=TOL)


def test_top_k_renormalises_the_teacher_and_keeps_the_full_student_softmax():
    hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
    parts = fused_loss(
        hidden,
        weight,
        labels,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        alpha=1.0,
        top_k=3,
    )
    top, index = F.linear(teacher_hidden, teacher_weight).topk(3, dim=-1)  # (N, 3)
    p = top.softmax(-1)  # renormalised over the 3 tokens
    log_q = F.linear(hidden, weight).log_softmax(-1).gather(1, index)  # student's full softmax
    kd = (p * (p.log() - log_q)).sum(-1)[labels != IGNORE_INDEX].mean()
    torch.testing.assert_close(parts.kd, kd, atol=TOL, rtol=TOL)


def test_tied_weight_gradient_adds_to_the_embedding_gradient():
    grads = []
    for fn in (fused_loss, unfused_loss):
        hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
        ids = labels.clamp_min(0)
        weight.requires_grad_(True)
        # The tied matrix is used twice: as the embedding (lookup) and as the output projection.
        h = F.embedding(ids, weight) + hidden  # (N, D)
        fn(
            h,
            weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            alpha=0.4,
            chunk_size=7,
        )[0].backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_gradient_for_only_one_input(needs):
    grads = []
    for fn in (fused_loss, unfused_loss):
        hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
        x = hidden if needs == "hidden" else weight
        x.requires_grad_(True)
        fn(
            hidden,
            weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            alpha=0.5,
            chunk_size=7,
        )[0].backward()
        assert (weight if needs == "hidden" else hidden).grad is None
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=TOL, rtol=TOL)


def test_teacher_equal_to_student_gives_zero_kd_and_zero_gradient():
    hidden, weight, labels, _, _ = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    parts = fused_loss(
        hidden,
        weight,
        labels,
        teacher_hidden=hidden,
        teacher_weight=weight,
        alpha=1.0,
        temperature=2.0,
        chunk_size=7,
    )
    parts.loss.backward()
    assert abs(parts.kd.item()) <= 1e-6
    assert parts.ce.item() > 1.0
    assert hidden.grad.abs().max().item() <= 1e-6
    assert weight.grad.abs().max().item() <= 1e-6


def test_no_teacher_alpha_zero_is_next_token_loss():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 11), generator=g)  # (B, T)
    hidden = torch.randn(3, 11, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g)
    parts = fused_loss(hidden, weight, next_token_labels(ids), chunk_size=4)
    want = next_token_loss(F.linear(hidden, weight), ids)
    torch.testing.assert_close(parts.loss, want, atol=1e-6, rtol=1e-6)
    assert parts.kd.item() == 0.0
    assert parts.num_predicted.item() == 3 * 10
    grad = torch.autograd.grad(parts.loss, hidden)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(want, hidden)[0], atol=TOL, rtol=TOL)


def test_next_token_labels():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert next_token_labels(ids).tolist() == [[6, 7, IGNORE_INDEX], [9, 10, IGNORE_INDEX]]


@pytest.mark.parametrize("case", ["ce", "mixed"])
def test_sum_is_mean_times_predicted_tokens(case):
    mean, grad_h, grad_w = _loss_and_grads(fused_loss, case, 7)
    total, sum_grad_h, sum_grad_w = _loss_and_grads(fused_loss, case, 7, reduction="sum")
    n = N - NUM_IGNORED
    assert total.num_predicted.item() == n
    for got, want in zip(total[:3], mean[:3]):
        torch.testing.assert_close(got, want * n, atol=1e-4, rtol=TOL)
    torch.testing.assert_close(sum_grad_h, grad_h * n, atol=1e-4, rtol=TOL)
    torch.testing.assert_close(sum_grad_w, grad_w * n, atol=1e-4, rtol=TOL)


def test_without_gradient_gives_the_same_values():
    with_grad, _, _ = _loss_and_grads(fused_loss, "mixed", 7)
    hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
    with torch.no_grad():
        parts = fused_loss(
            hidden,
            weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            **CASES["mixed"],
        )
    for got, want in zip(parts, with_grad):
        torch.testing.assert_close(got, want.detach(), atol=TOL, rtol=TOL)


def test_backward_scales_by_the_incoming_gradient():
    _, grad_h, grad_w = _loss_and_grads(fused_loss, "mixed", 7)
    hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = fused_loss(
        hidden, weight, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, **CASES["mixed"]
    ).loss
    (loss * 3.0).backward()
    torch.testing.assert_close(hidden.grad, grad_h * 3.0, atol=TOL, rtol=TOL)
    torch.testing.assert_close(weight.grad, grad_w * 3.0, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", ["ce", "mixed", "top_k"])
def test_bf16_inputs_are_close_to_fp32(case):
    loss_tol = 2e-2
    fp32, grad_h, grad_w = _loss_and_grads(fused_loss, case, 7)
    bf16, bf_grad_h, bf_grad_w = _loss_and_grads(fused_loss, case, 7, dtype=torch.bfloat16)
    assert bf16.loss.dtype == torch.float32
    assert bf_grad_h.dtype == torch.bfloat16 and bf_grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.loss.detach(), fp32.loss.detach(), atol=loss_tol, rtol=loss_tol)
    # bf16 keeps 8 bits of mantissa: gradients agree to a few percent of their largest entry.
    for got, want in ((bf_grad_h, grad_h), (bf_grad_w, grad_w)):
        assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_autocast_matches_the_unfused_loss_under_autocast():
    results = []
    for fn in (fused_loss, unfused_loss):
        hidden, weight, labels, teacher_hidden, teacher_weight = _inputs()
        weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = fn(
                hidden,
                weight,
                labels,
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight,
                alpha=0.5,
            )
        parts.loss.backward()
        assert weight.grad.dtype == torch.float32
        results.append((parts.loss.detach(), weight.grad))
    (fused, fused_grad), (ref, ref_grad) = results
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)  # both multiply in bf16
    assert (fused_grad - ref_grad).abs().max() <= 1e-2 * ref_grad.abs().max()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.5), "teacher"),
        (dict(alpha=1.5), "alpha"),
        (dict(reduction="max"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    hidden, weight, labels, _, _ = _inputs()
    with pytest.raises(ValueError, match=message):
        fused_loss(hidden, weight, labels, **kwargs)
