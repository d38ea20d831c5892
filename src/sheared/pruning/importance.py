"""One-shot structure importance (SPEC §10): activations, weight magnitudes, or random; and the
masks and initial `log_alpha` made from such scores.

Every method returns a score for every structure of the source, in the shapes of the masks:

| name           | shape     | activation (Minitron / ShortGPT)            | magnitude (no data)                    |
|----------------|-----------|---------------------------------------------|----------------------------------------|
| `layer`        | (L,)      | mean over tokens of 1 - cos(x_in, x_out)     | ‖o_proj‖ and ‖down_proj‖ (Frobenius)    |
| `kv_group`     | (L, G)    | sum of its r heads' scores                   | its heads' weights and its k/v rows     |
| `head`         | (L, G, r) | Σ_tokens ‖head output before o_proj‖₂        | its q rows (and bias) and o_proj columns|
| `intermediate` | (L, I)    | ‖act(gate)·up‖₂ over tokens                  | its gate and up rows, down_proj column  |
| `hidden`       | (d,)      | Σ over the norms feeding layers of ‖x_j‖₂    | every weight entry reading or writing j |

Higher is more important. A magnitude score is the Frobenius norm of all the weights the structure
owns (that leave the model with it), except layers, which are ranked by their output projections.

Activation statistics are summed in float64 over per-sequence float32 reductions, so the result
does not depend on how the calibration sequences are split across data-parallel ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sheared.errors import UserError
from sheared.model.args import ModelArgs
from sheared.model.masks import Masks
from sheared.pruning.hard_concrete import (
    BETA,
    LIMIT_LEFT,
    LIMIT_RIGHT,
    LOG_ALPHA_MAX,
    PROJECTION_LOG_ALPHA_MIN,
    top_k_binary,
)
from sheared.pruning.target import MASK_TYPES, MaskSpec

SCORING_METHODS = ("activation", "magnitude", "random")
# Initial log_alpha from a ranking (`pruning.init`): within each row, the structures the one-shot
# method keeps get values from KEEP_HIGH down to KEEP_LOW by rank, the ones it drops from DROP_HIGH
# down to DROP_LOW. P(z = 0) is 0.002 at ln 100 and 0.016 at 2.5, so every structure is still kept
# in about 98% or more of the step-0 samples, while the Lagrangian's pressure (which moves a lower
# log_alpha faster: the score's slope is steeper there) removes the dropped ones first.
KEEP_HIGH = LOG_ALPHA_MAX
KEEP_LOW = 4.0
DROP_HIGH = 3.5
DROP_LOW = 2.5
# `pruning.init: oneshot` (SPEC §11): start from the one-shot choice itself. The kept structures sit
# well inside the kept region and the dropped ones at, or just below, the decision boundary (the
# log_alpha where P(z != 0) = 1/2: beta·ln(-l/r) ≈ -1.60), so that the gap between the two sets —
# ONESHOT_KEEP_LOW − ONESHOT_DROP_HIGH ≈ 5.6 here, against 0.5 above — survives the first steps and the
# learned masks only have to correct the ranking. The projection controller then shifts every row
# onto its target; the gap and the order are what it keeps.
DECISION_BOUNDARY = BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT)
ONESHOT_KEEP_HIGH = LOG_ALPHA_MAX
ONESHOT_KEEP_LOW = 4.0
ONESHOT_DROP_HIGH = (
    PROJECTION_LOG_ALPHA_MIN + 1.0
)  # well below the decision boundary (−1.60): P(z != 0) 0.012
ONESHOT_DROP_LOW = PROJECTION_LOG_ALPHA_MIN
LEVELS = {  # init -> (keep high, keep low, drop high, drop low)
    "ranked": (KEEP_HIGH, KEEP_LOW, DROP_HIGH, DROP_LOW),
    "oneshot": (ONESHOT_KEEP_HIGH, ONESHOT_KEEP_LOW, ONESHOT_DROP_HIGH, ONESHOT_DROP_LOW),
}

Scores = dict[str, torch.Tensor]
AllReduce = Callable[[torch.Tensor], None]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a parameter (gathered when it is an FSDP2 DTensor), in float64, on the CPU."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().double().cpu()


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "module", model)  # DDP keeps the model under .module
    return inner.model.layers


# --- activation importance -------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Float64 sums over calibration tokens; filled by forward hooks, all-reduced, then turned into scores."""

    head: torch.Tensor
    """(L, H) Σ_tokens ‖o_{l,h}‖₂."""
    channel_sq: torch.Tensor
    """(L, I) Σ_tokens a²."""
    hidden_sq: torch.Tensor
    """(2L, d) Σ_tokens x² of every input and post-attention norm output."""
    influence: torch.Tensor
    """(L,) Σ_tokens (1 - cos(x_in, x_out))."""
    tokens: torch.Tensor
    """() tokens seen."""
    active: bool = True
    """Whether the hooks add what they see (off for the padding passes that keep ranks in step)."""

    @classmethod
    def zeros(cls, args: ModelArgs) -> ActivationStats:
        L, H, d = args.num_hidden_layers, args.num_attention_heads, args.hidden_size
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        return cls(z(L, H), z(L, args.intermediate_size), z(2 * L, d), z(L), z())

    def tensors(self) -> list[torch.Tensor]:
        return [self.head, self.channel_sq, self.hidden_sq, self.influence, self.tokens]

    def scores(self, args: ModelArgs) -> Scores:
        L, G, r = args.num_hidden_layers, args.num_key_value_heads, args.heads_per_group
        head = self.head.view(L, G, r)
        return {
            "layer": self.influence / self.tokens,
            "kv_group": head.sum(-1),
            "head": head.clone(),
            "intermediate": self.channel_sq.sqrt(),
            "hidden": self.hidden_sq.sqrt().sum(0),
        }


def _adder(stats: ActivationStats) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def add(total: torch.Tensor, value: torch.Tensor) -> None:
        if stats.active:  # float32 reduction, float64 sum (see the module docstring)
            total += value.detach().float().cpu().double()

    return add


def _hooks(model: nn.Module, args: ModelArgs, stats: ActivationStats) -> list:
    """Register the forward hooks that fill `stats`; returns their handles."""
    H, D = args.num_attention_heads, args.head_dim
    _add = _adder(stats)
    handles = []
    for i, layer in enumerate(_layers(model)):

        def head_hook(module, inputs, i=i):
            x = inputs[0]  # (B, T, H * D)
            _add(stats.head[i], x.float().unflatten(-1, (H, D)).norm(dim=-1).sum((0, 1)))

        def channel_hook(module, inputs, i=i):
            _add(stats.channel_sq[i], inputs[0].float().pow(2).sum((0, 1)))  # (I,)

        def norm_hook(module, inputs, output, row=None):
            _add(stats.hidden_sq[row], output.float().pow(2).sum((0, 1)))  # (d,)

        def layer_hook(module, inputs, output, i=i):
            x_in, x_out = inputs[0].float(), output.float()  # (B, T, d)
            _add(stats.influence[i], (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum())
            if i == 0:
                _add(stats.tokens, torch.tensor(float(x_in.shape[0] * x_in.shape[1])))

        handles += [
            layer.self_attn.o_proj.register_forward_pre_hook(head_hook),
            layer.mlp.down_proj.register_forward_pre_hook(channel_hook),
            layer.input_layernorm.register_forward_hook(lambda m, a, o, row=2 * i: norm_hook(m, a, o, row)),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, row=2 * i + 1: norm_hook(m, a, o, row)
            ),
            layer.register_forward_hook(layer_hook),
        ]
    return handles


@torch.no_grad()
def activation_stats(
    model: nn.Module,
    args: ModelArgs,
    batches: Iterable[tuple[torch.Tensor, bool]],
    masks: Masks | None = None,
    all_reduce: AllReduce | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ActivationStats:
    """Run `model` over token-id batches (each (B, T)) and collect the activation statistics.

    Args:
        model: our decoder (possibly wrapped by DDP / FSDP2), in eval mode.
        args: its shape.
        batches: this rank's calibration batches (B, T), already on the model's device, each with
            whether it counts (False: a padding pass so that every rank runs as many forward passes).
        masks: masks for every forward pass (e.g. dropped layers), or None.
        all_reduce: sums a tensor over data-parallel ranks in place (None: one process).
        autocast_dtype: run under autocast to this dtype.
    """
    stats = ActivationStats.zeros(args)
    handles = _hooks(model, args, stats)
    try:
        for ids, counted in batches:
            stats.active = counted
            with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(ids, masks) if masks is not None else model(ids)
    finally:
        for h in handles:
            h.remove()
    if all_reduce is not None:
        for t in stats.tensors():
            all_reduce(t)
    return stats


# --- magnitude and random ---------------------------------------------------------------------------


@torch.no_grad()
def magnitude_scores(model: nn.Module, args: ModelArgs) -> Scores:
    """Frobenius norms of the weights each structure owns (layers: their output projections)."""
    L, G, r, D = args.num_hidden_layers, args.num_key_value_heads, args.heads_per_group, args.head_dim
    d = args.hidden_size
    inner = getattr(model, "module", model)
    head_sq = torch.zeros(L, G * r, dtype=torch.float64)
    kv_sq = torch.zeros(L, G, dtype=torch.float64)
    channel_sq = torch.zeros(L, args.intermediate_size, dtype=torch.float64)
    layer = torch.zeros(L, dtype=torch.float64)
    hidden_sq = _full(inner.model.embed_tokens.weight).pow(2).sum(0) + _full(inner.model.norm.weight).pow(2)
    if inner.lm_head is not None:
        hidden_sq += _full(inner.lm_head.weight).pow(2).sum(0)
    for i, block in enumerate(inner.model.layers):
        attn, mlp = block.self_attn, block.mlp
        q, k, v, o = (_full(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        gate, up, down = (_full(m.weight) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        head_sq[i] = q.view(G * r, D, d).pow(2).sum((1, 2)) + o.view(d, G * r, D).pow(2).sum((0, 2))
        kv_sq[i] = k.view(G, D, d).pow(2).sum((1, 2)) + v.view(G, D, d).pow(2).sum((1, 2))
        if attn.q_proj.bias is not None:
            head_sq[i] += _full(attn.q_proj.bias).view(G * r, D).pow(2).sum(1)
            kv_sq[i] += (_full(attn.k_proj.bias).pow(2) + _full(attn.v_proj.bias).pow(2)).view(G, D).sum(1)
        channel_sq[i] = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
        layer[i] = (o.pow(2).sum() + down.pow(2).sum()).sqrt()
        hidden_sq += sum(w.pow(2).sum(0) for w in (q, k, v, gate, up)) + o.pow(2).sum(1) + down.pow(2).sum(1)
        hidden_sq += _full(block.input_layernorm.weight).pow(2) + _full(
            block.post_attention_layernorm.weight
        ).pow(2)
    head_sq = head_sq.view(L, G, r)
    return {
        "layer": layer,
        "kv_group": (head_sq.sum(-1) + kv_sq).sqrt(),
        "head": head_sq.sqrt(),
        "intermediate": channel_sq.sqrt(),
        "hidden": hidden_sq.sqrt(),
    }


def random_scores(args: ModelArgs, seed: int) -> Scores:
    """Seeded uniform scores: the sanity floor (any ranking is as good as this one?)."""
    g = torch.Generator().manual_seed(seed)
    shapes = structure_shapes(args)
    return {name: torch.rand(shapes[name], generator=g, dtype=torch.float64) for name in MASK_TYPES}


def structure_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape of every mask type's scores for a source of this shape."""
    L, G, r = args.num_hidden_layers, args.num_key_value_heads, args.heads_per_group
    return {
        "layer": (L,),
        "kv_group": (L, G),
        "head": (L, G, r),
        "intermediate": (L, args.intermediate_size),
        "hidden": (args.hidden_size,),
    }


# --- from scores to masks and log_alpha -------------------------------------------------------------


def select_masks(scores: Scores, specs: Iterable[MaskSpec]) -> Masks:
    """Binary masks keeping the top target count by score in every row, ties broken by index.

    For GQA this keeps the best KV groups and, inside every group, its best heads, so every kept
    group keeps the same number of query heads.
    """
    return Masks(**{s.name: top_k_binary(scores[s.name].float(), s.target_kept) for s in specs})


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row (last dimension): 0 = highest score, ties by index."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    return order.argsort(dim=-1, stable=True)


def initial_log_alpha(scores: torch.Tensor, kept: int, levels: str = "ranked") -> torch.Tensor:
    """log_alpha (same shape as `scores`) that orders every row like its scores.

    Args:
        scores: (..., n) one row per mask row.
        kept: entries per row the target keeps.
        levels: `ranked` (KEEP_/DROP_: everything still kept at step 0) or `oneshot` (ONESHOT_: the
            one-shot choice, dropped structures at the decision boundary).
    """
    keep_high, keep_low, drop_high, drop_low = LEVELS[levels]
    n = scores.shape[-1]
    rank = row_ranks(scores).double()
    keep = keep_high - (keep_high - keep_low) * rank / max(kept - 1, 1)
    drop = drop_high - (drop_high - drop_low) * (rank - kept) / max(n - kept - 1, 1)
    return torch.where(rank < kept, keep, drop).float()


def non_finite_scores(scores: Scores) -> str | None:
    """None when every score is finite, else which mask type holds how many NaN or infinite ones."""
    for name, values in scores.items():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            return f"{bad} of {values.numel()} {name} scores are NaN or infinite"
    return None


def check_scores_shape(scores: Scores, args: ModelArgs, where: str) -> None:
    """Refuse scores made for a source of another shape, in one line."""
    expected = structure_shapes(args)
    for name, shape in expected.items():
        got = tuple(scores[name].shape) if name in scores else None
        if got != shape:
            raise UserError(
                f"{where} holds scores of another source ({name} scores of shape {got}, this source needs "
                f"{shape}); compute them again for this source"
            )
