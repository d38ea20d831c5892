"""Masked model ≡ compacted model: same logits under exact-target binary masks (fp32)."""

import pytest
import torch
from helpers import PRUNE_CASES as CASES
from helpers import ours_from_hf, tiny_hf_model, token_batch

from sheared.model import CausalLM
from sheared.pruning import L0Module, TargetShape
from sheared.pruning.compaction import kept_structure, slice_state_dict
from sheared.pruning.params import expected_num_params


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_compacted(case, seed):
    source_kwargs, target_shape = CASES[case]
    model = ours_from_hf(tiny_hf_model(**source_kwargs))
    target = TargetShape(*target_shape)
    l0 = L0Module(model.args, target)
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.normal_(0, 2, generator=torch.Generator().manual_seed(seed))
    masks = l0.deterministic("target")

    small = CausalLM(target.model_args(model.args))
    small.load_state_dict(
        slice_state_dict(model.state_dict(), model.args, kept_structure(model.args, masks)), strict=True
    )
    ids = token_batch(seq=20)
    with torch.no_grad():
        masked, compact = model(ids, masks), small.eval()(ids)
    assert masked.std() > 0.3
    torch.testing.assert_close(compact, masked, atol=1e-5, rtol=0)
    binary_scores = {name: getattr(masks, name) for name in masks.names()}
    assert small.num_params() == expected_num_params(model.args, binary_scores).item() < model.num_params()
