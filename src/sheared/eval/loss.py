"""Cross-entropy and logit distillation from hidden states, fused and chunked over the tokens.

With a 128k vocabulary the (N, V) logits, their float32 log-softmax and their gradient are the
largest activations of a training step, and a teacher doubles them. `fused_loss` never holds
them: it walks over chunks of rows, computes each chunk's logits, loss and gradient with respect
to the logits, turns that gradient into the gradients of the hidden states (N, d) and of the
output projection (V, d) at once, and drops the chunk. Backward only scales the two saved
gradients by the incoming gradient. So the gradient's matmuls are paid in the forward call, and
only there when a gradient is wanted: under `torch.no_grad` (evaluation) none is computed. `unfused_loss` computes the same thing the plain way (full
logits, autograd); the tests and `bench/loss_memory.py` compare the two.

The loss (SPEC section 10), with N' the number of predicted (label != -100) tokens:

    loss = (1 - alpha) * CE + alpha * temperature**2 * KD
    CE = 1/N' * sum_i -log softmax(z_S,i)[y_i]
    KD = 1/N' * sum_i KL(softmax(z_T,i / temperature) || softmax(z_S,i / temperature))

z_S = hidden @ weight.T are the student's logits, z_T = teacher_hidden @ teacher_weight.T the
teacher's; no gradient ever reaches the teacher. Ignored positions count in neither term.

Gradient with respect to the student's logits of one predicted row i (p = softmax(z_S),
q = softmax(z_S / temperature), p_T = softmax(z_T / temperature)):

    dloss / dz_S,i = 1/N' * [(1 - alpha) * (p - onehot(y_i)) + alpha * temperature * (q - p_T)]

Top-k distillation (`top_k=k`): only the teacher's k largest logits of each token count. Their
probabilities are renormalised over those k tokens (p~ = softmax of the k logits / temperature;
the teacher's remaining mass is dropped), and the student keeps its FULL log-softmax:

    KD_i = sum_{j in topk_i} p~_j * (log p~_j - log q_j),    dKD_i / dz_S,i = (q - scatter(p~)) / temperature

so the student is pushed to put all its mass on the teacher's top k (mass elsewhere is penalised
through log q). With k = V this is the full KL.

Numerics: logits, softmax and the losses are float32 whatever the input dtype. The matrix
multiplies run in the input dtype (or autocast's dtype when autocast is on for the device, as
`F.linear` would), the (V, d) weight gradient is accumulated over chunks in float32, and the
returned gradients have the dtypes of `hidden` and `weight`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sheared.eval.lm import IGNORE_INDEX

# Default rows per chunk: as many as keep one (rows, V) float32 buffer at about 256 MiB
# (2**26 elements; 523 rows for Llama 3's 128,256 tokens). Up to four such buffers are live at once
# with a teacher, and a few hundred rows keep the matrix multiplies efficient.
CHUNK_ELEMENTS = 2**26
REDUCTIONS = ("mean", "sum")


class LossParts(NamedTuple):
    """The loss and its parts; `loss` carries the gradient, the rest are detached, for logging.

    All are 0-dim tensors: `loss`, `ce` and `kd` float32 (means or sums as `reduction` asked; `kd`
    is 0 without a teacher), `num_predicted` int64 (the number of labels != -100).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_predicted: torch.Tensor


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels (B, T) for token ids (B, T): labels[:, t] = input_ids[:, t + 1], -100 at the last position."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk that keep one (rows, vocab_size) float32 buffer at about CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def fused_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> LossParts:
    """(1 - alpha) * CE + alpha * temperature**2 * KD without ever holding the (N, V) logits.

    Args:
        hidden: (N, d) or (B, T, d) the student's final hidden states (float32 / bf16 / fp16).
        weight: (V, d) the student's output projection (the embedding when tied).
        labels: (N,) or (B, T) int64 target ids, -100 where nothing is predicted
            (see `next_token_labels`).
        teacher_hidden: (N, d_t) or (B, T, d_t) the teacher's final hidden states; never gets a gradient.
        teacher_weight: (V, d_t) the teacher's output projection; never gets a gradient.
        alpha: weight of the distillation term in [0, 1]; > 0 needs a teacher.
        temperature: softmax temperature of the distillation term, > 0.
        top_k: distil over the teacher's top k tokens only (module docstring); None = all V.
        chunk_size: rows of N per chunk (need not divide N); None = `default_chunk_size(V)`.
        reduction: `mean` over the predicted tokens (0 when there are none), or `sum`.

    Returns:
        LossParts; `loss` is differentiable with respect to `hidden` and `weight`.
    """
    args = _prepare(
        hidden, weight, labels, teacher_hidden, teacher_weight, alpha, temperature, top_k, reduction
    )
    hidden, weight, labels, teacher_hidden, teacher_weight = args
    rows = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if rows < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    # The matmul dtypes are decided here, under the caller's autocast state; the loop runs without
    # autocast, which would otherwise cast the (V, d) weight again for every chunk.
    teacher_dtype = None if teacher_hidden is None else _compute_dtype(teacher_hidden, teacher_weight)
    settings = _Settings(
        alpha, temperature, top_k, rows, reduction == "mean", _compute_dtype(hidden, weight), teacher_dtype
    )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, ce, kd, num = _FusedLoss.apply(hidden, weight, labels, teacher_hidden, teacher_weight, settings)
        return LossParts(loss, ce, kd, num)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, ce, kd, num, _, _ = _chunked(hidden, weight, labels, teacher_hidden, teacher_weight, settings)
    return LossParts(loss, ce, kd, num)


def unfused_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> LossParts:
    """The same loss as `fused_loss`, computed plainly: full (N, V) logits and autograd.

    The reference for tests and benchmarks; `chunk_size` is accepted for a common signature and unused.
    """
    del chunk_size
    args = _prepare(
        hidden, weight, labels, teacher_hidden, teacher_weight, alpha, temperature, top_k, reduction
    )
    hidden, weight, labels, teacher_hidden, teacher_weight = args
    valid = labels != IGNORE_INDEX  # (N,)
    num = valid.sum()
    logits = F.linear(hidden, weight).float()  # (N, V)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kd = logits.new_zeros(())
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight).float() / temperature  # (N, V)
        log_q = F.log_softmax(logits / temperature, dim=-1)  # (N, V)
        if top_k is None:
            log_p = F.log_softmax(teacher_logits, dim=-1)
        else:
            top, index = teacher_logits.topk(top_k, dim=-1)  # (N, k)
            log_p, log_q = F.log_softmax(top, dim=-1), log_q.gather(1, index)
        kd_rows = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
        kd = torch.where(valid, kd_rows, 0.0).sum()
    scale = 1.0 / num.clamp_min(1) if reduction == "mean" else 1.0
    ce, kd = ce * scale, kd * scale
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kd
    return LossParts(loss, ce.detach(), kd.detach(), num)


class _Settings(NamedTuple):
    alpha: float
    temperature: float
    top_k: int | None
    chunk_size: int
    mean: bool
    dtype: torch.dtype  # of the student's matmuls
    teacher_dtype: torch.dtype | None  # of the teacher's matmul


class _FusedLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher_hidden, teacher_weight, settings):
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, ce, kd, num, grad_hidden, grad_weight = _chunked(
                hidden, weight, labels, teacher_hidden, teacher_weight, settings, needs_hidden, needs_weight
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, kd, num)
        return loss, ce, kd, num

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    settings: _Settings,
    needs_hidden: bool = False,
    needs_weight: bool = False,
):
    """The loop over chunks of rows: loss, ce, kd, num_predicted and the (optional) gradients."""
    alpha, temperature, dtype = settings.alpha, settings.temperature, settings.dtype
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    rows = min(settings.chunk_size, max(num_rows, 1))
    valid = labels != IGNORE_INDEX  # (N,)
    num = valid.sum()
    scale = 1.0 / num.clamp_min(1).float() if settings.mean else torch.ones((), device=hidden.device)
    # Per-row factors of the two gradient terms, zero on ignored rows (module docstring).
    ce_coef = valid * (scale * (1.0 - alpha))  # (N,)
    kd_coef = valid * (scale * (alpha * temperature))  # (N,)
    w = weight.to(dtype)  # (V, d), cast once rather than per chunk
    teacher_w = None if teacher_weight is None else teacher_weight.to(settings.teacher_dtype)
    # (rows, V) float32 work buffers, allocated once and reused by every chunk: on CPU, paging in
    # a fresh buffer per chunk costs as much as two passes over it.
    num_buffers = 1 if teacher_hidden is None else (3 if settings.top_k is not None else 4)
    buffers = torch.empty((num_buffers, rows, vocab), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None  # (N, d)
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
    )
    ce_sum = torch.zeros((), device=hidden.device)
    kd_sum = torch.zeros((), device=hidden.device)
    for start in range(0, num_rows, rows):
        chunk = slice(start, start + rows)
        work = buffers[:, : min(rows, num_rows - start)]  # (num_buffers, c, V)
        h = hidden[chunk].to(dtype)  # (c, d)
        z = _logits(h, w, out=work[0])
        teacher_z = None
        if teacher_hidden is not None:
            teacher_z = _logits(teacher_hidden[chunk].to(teacher_w.dtype), teacher_w, out=work[1])
        coefs = (ce_coef[chunk], kd_coef[chunk]) if needs_hidden or needs_weight else None
        ce, kd, grad_z = _chunk_loss(z, labels[chunk], teacher_z, work[2:], settings, coefs)
        ce_sum += ce
        kd_sum += kd
        if grad_z is None:
            continue
        grad_z = grad_z.to(dtype)  # (c, V)
        if grad_hidden is not None:
            grad_hidden[chunk] = grad_z @ w
        if grad_weight is not None:
            if dtype == torch.float32:
                grad_weight.addmm_(grad_z.T, h)
            else:
                grad_weight += grad_z.T @ h  # (V, d) in `dtype`, accumulated in float32
    ce, kd = ce_sum * scale, kd_sum * scale
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kd
    return loss, ce, kd, num, grad_hidden, grad_weight


def _logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """h (c, d) @ w.T (d, V) into the float32 buffer `out` (c, V); the matmul runs in w's dtype."""
    if w.dtype == torch.float32:
        return torch.mm(h, w.T, out=out)
    return out.copy_(torch.mm(h, w.T))


def _chunk_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    teacher_z: torch.Tensor | None,
    spare: torch.Tensor,
    settings: _Settings,
    coefs: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sums of CE and KD over one chunk's predicted rows, and dloss/dz when `coefs` are given.

    Args:
        z: (c, V) float32 student logits; overwritten (it becomes the gradient).
        labels: (c,) int64, -100 = ignored.
        teacher_z: (c, V) float32 teacher logits or None; overwritten.
        spare: (2, c, V) or (1, c, V) float32 work buffers for the KD term (top-k needs one).
        settings: alpha, temperature, top_k.
        coefs: per-row factors (c,) of the CE and KD gradient terms, or None for no gradient.
    """
    valid = labels != IGNORE_INDEX  # (c,)
    target = labels.clamp_min(0)[:, None]  # (c, 1); ignored rows point at token 0 and are masked
    z.sub_(z.amax(dim=-1, keepdim=True))  # row max 0: exp cannot overflow, softmax unchanged
    z_target = z.gather(1, target).squeeze(1)  # (c,)
    kd, grad_kd = z.new_zeros(()), None
    if teacher_z is not None:
        kd_rows, grad_kd = _kd_rows(z, teacher_z, spare, settings, coefs is not None)
        kd = torch.where(valid, kd_rows, 0.0).sum()
    p = z.exp_()  # (c, V) unnormalised softmax, in place
    total = p.sum(dim=-1, keepdim=True)  # (c, 1)
    ce = torch.where(valid, total.log().squeeze(1) - z_target, 0.0).sum()
    if coefs is None:
        return ce, kd, None
    ce_coef, kd_coef = coefs
    grad = p.mul_(ce_coef[:, None] / total)  # (1 - alpha)/N' * softmax(z)
    grad.scatter_add_(1, target, -ce_coef[:, None])  # ... minus (1 - alpha)/N' * onehot(y)
    if grad_kd is not None:
        grad.addcmul_(grad_kd, kd_coef[:, None])
    return ce, kd, grad


def _kd_rows(
    z: torch.Tensor, teacher_z: torch.Tensor, spare: torch.Tensor, settings: _Settings, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(p_T || q) per row (c,) and, if asked, q - p_T (c, V), the KD gradient times temperature.

    `z` (c, V) are the student's logits with row max 0 (read only); `teacher_z` (c, V) is overwritten
    and `spare` (2 or 1, c, V) is work space. With a and b the student's and the teacher's logits
    over temperature, each shifted to row max 0, KL = sum p_T (b - a) + log sum e^a - log sum e^b:
    the log-softmaxes are never formed, and a teacher identical to the student gives exactly 0 and
    a zero gradient (every step is the same operation on the same numbers).
    """
    temperature = settings.temperature
    b = teacher_z.sub_(teacher_z.amax(dim=-1, keepdim=True)).div_(temperature)  # (c, V)
    a = torch.div(z, temperature, out=spare[0])  # (c, V)
    if settings.top_k is None:
        p = torch.exp(b, out=spare[1])  # (c, V)
        p_total = p.sum(dim=-1, keepdim=True)  # (c, 1)
        p.div_(p_total)  # p_T
        cross = b.sub_(a).mul_(p).sum(dim=-1)  # (c,) sum p_T (b - a)
        q = a.exp_()
        q_total = q.sum(dim=-1, keepdim=True)
        kd_rows = cross + (q_total.log() - p_total.log()).squeeze(1)
        grad = q.div_(q_total).sub_(p) if with_grad else None
        return kd_rows, grad
    top, index = b.topk(settings.top_k, dim=-1)  # (c, k)
    log_p = F.log_softmax(top, dim=-1)  # renormalised over the top k
    p = log_p.exp()
    a_top = a.gather(1, index)  # (c, k)
    q = a.exp_()
    q_total = q.sum(dim=-1, keepdim=True)
    kd_rows = (p * (log_p - a_top + q_total.log())).sum(dim=-1)  # log q = a - log sum e^a
    grad = q.div_(q_total).scatter_add_(1, index, -p) if with_grad else None
    return kd_rows, grad


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear(hidden, weight) would use: autocast's if on, else the inputs' common one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _prepare(hidden, weight, labels, teacher_hidden, teacher_weight, alpha, temperature, top_k, reduction):
    """Checks the arguments; flattens (B, T, ...) to (N, ...) and detaches the teacher."""
    if hidden.dim() not in (2, 3) or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden (N, d) or (B, T, d) must match labels (N,) or (B, T); got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight go together: give both or neither")
    if teacher_hidden is not None:
        if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} must have the tokens of hidden {tuple(hidden.shape)}"
            )
        if teacher_weight.shape != (weight.shape[0], teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher_weight must be ({weight.shape[0]}, {teacher_hidden.shape[-1]}), "
                f"got {tuple(teacher_weight.shape)}"
            )
        teacher_hidden = teacher_hidden.detach().flatten(0, -2)
        teacher_weight = teacher_weight.detach()
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0.0 and teacher_hidden is None:
        raise ValueError(f"alpha={alpha} distils from a teacher: give teacher_hidden and teacher_weight")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= weight.shape[0]:
        raise ValueError(f"top_k must be in [1, {weight.shape[0]}] or None, got {top_k}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return hidden.flatten(0, -2), weight, labels.flatten().long(), teacher_hidden, teacher_weight
