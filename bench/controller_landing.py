"""Does the controller land the masks on the target at any run length? (no model needed)

    python bench/controller_landing.py                       # both controllers, 48/146/610/3200 steps
    python bench/controller_landing.py --steps 48 146 --lr 0.5 --warmup 0.3   # other settings

Drives the real L0 module, controller (`sheared.pruning.controller`), AdamW groups and learning-rate
schedule of a pruning run for SmolLM2-135M → the demo target (24 layers / 512 / 4 heads in 2 KV
groups / 1024), with a fixed random stand-in for the language-model gradient: lm = Σ_m mean(w_m · z_m)
over the sampled masks z, w_m ~ Normal(0, 1) fixed per structure (some structures "want" to stay,
others to go, as a language model's loss would say). Prints, per controller and run length, the gap
|expected − target sparsity| of every mask type at the end and the expected parameter count.
"""

from __future__ import annotations

import argparse
import math

import torch

from sheared.model import ModelArgs, parameter_counts
from sheared.pruning import TargetShape
from sheared.pruning.controller import CONTROLLERS, TargetController
from sheared.train.config import OptimConfig, PruningConfig
from sheared.train.loop import mask_generator
from sheared.train.optim import build_optimizer, lr_multiplier, set_learning_rates

SMOLLM2 = ModelArgs(
    family="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)
DEMO_TARGET = TargetShape(
    num_hidden_layers=24,
    hidden_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
)


def drive(
    kind: str, steps: int, pruning: PruningConfig, optim: OptimConfig, seed: int = 0
) -> dict[str, float]:
    """Run `steps` model-free pruning steps; every mask type's final |expected − target| sparsity gap
    (mean over rows, as the metrics log it), and `expected_params` / `target_params`."""
    torch.manual_seed(seed)
    l0 = TargetController.make_l0(kind, SMOLLM2, DEMO_TARGET)
    l0.reset_parameters(torch.Generator().manual_seed(seed))
    controller = TargetController(l0, kind, round(pruning.lagrangian_warmup_fraction * steps))
    controller.start()
    weights = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1))
        for n, p in l0.log_alpha.items()
    }
    optimizer = build_optimizer(
        [],
        optim,
        log_alpha=l0.parameters(),
        lambdas=controller.lagrangian.parameters() if controller.lagrangian is not None else (),
        pruning=pruning,
    )
    for step in range(steps):
        set_learning_rates(optimizer, lr_multiplier(step, steps, optim.warmup_fraction, optim.min_lr_ratio))
        l0.clamp_()
        masks = l0.sample(mask_generator(seed, step, 0))
        lm = sum((weights[n] * getattr(masks, n)).mean() for n in masks.names())
        constraint, _ = controller.constraint(step)
        (lm + constraint).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.after_step(step)
    with torch.no_grad():
        target = l0.target_sparsity()
        gaps = {n: abs(s.mean().item() - target[n]) for n, s in l0.expected_sparsity().items()}
        goal = parameter_counts(DEMO_TARGET.model_args(SMOLLM2))["num_params"]
        gaps["params_ratio"] = l0.expected_num_params().item() / goal
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[48, 146, 610, 3200])
    parser.add_argument("--controller", choices=CONTROLLERS, nargs="+", default=list(CONTROLLERS))
    parser.add_argument(
        "--lr", type=float, default=None, help="log_alpha and lambda lr (default: the config's)"
    )
    parser.add_argument("--warmup", type=float, default=None, help="target warm-up fraction")
    a = parser.parse_args()
    pruning = PruningConfig(target=DEMO_TARGET)
    if a.lr is not None:
        pruning.log_alpha_lr = pruning.lambda_lr = a.lr
    if a.warmup is not None:
        pruning.lagrangian_warmup_fraction = a.warmup
    print(
        f"SmolLM2-135M -> demo target; log_alpha lr {pruning.log_alpha_lr}, lambda lr {pruning.lambda_lr}, "
        f"target warm-up {pruning.lagrangian_warmup_fraction:.0%}, AdamW + warm-up 10% + cosine to 0.1x"
    )
    names = list(l0_names := TargetController.make_l0("lagrangian", SMOLLM2, DEMO_TARGET).specs)
    print(f"| controller | steps | {' | '.join(names)} | worst gap | expected / target params |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for kind in a.controller:
        for steps in a.steps:
            gaps = drive(kind, steps, pruning, OptimConfig())
            worst = max(gaps[n] for n in l0_names)
            cells = " | ".join(f"{gaps[n]:.4f}" for n in names)
            print(f"| {kind} | {steps} | {cells} | {worst:.4f} | {gaps['params_ratio']:.3f} |", flush=True)
    assert math.isfinite(worst)


if __name__ == "__main__":
    main()
