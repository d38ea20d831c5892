"""Per-domain evaluation: token-weighted means, masks, and the all-reduce over ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ours_from_hf, tiny_hf_model

from sheared.eval.domain_loss import domain_losses
from sheared.eval.lm import next_token_loss
from sheared.model import Masks


class InMemory:
    """Two domains of random sequences; a stand-in for prepared data."""

    def __init__(self, sizes=(5, 3), seq_len=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.domains = ["a", "b"]
        self.data = {d: torch.randint(0, 97, (n, seq_len), generator=g) for d, n in zip(self.domains, sizes)}

    def num_sequences(self, domain, split):
        assert split == "eval"
        return len(self.data[domain])

    def sequences(self, domain, split, indices):
        return self.data[domain][list(indices)]


def _expected(model, data, masks=None):
    with torch.no_grad():
        return {d: next_token_loss(model(x, masks), x).item() for d, x in data.data.items()}


def test_matches_direct_mean_over_all_tokens():
    model = ours_from_hf(tiny_hf_model())
    data = InMemory()
    got = domain_losses(model, data, batch_size=2)  # uneven batches: 2 + 2 + 1 and 2 + 1
    assert got == pytest.approx(_expected(model, data), abs=1e-6)


def test_masks_are_applied_and_max_sequences_limits():
    model = ours_from_hf(tiny_hf_model())
    data = InMemory()
    masks = Masks(layer=torch.tensor([1.0, 0.0]))
    got = domain_losses(model, data, batch_size=4, masks=masks)
    assert got == pytest.approx(_expected(model, data, masks), abs=1e-6)
    assert got["a"] != pytest.approx(domain_losses(model, data)["a"], abs=1e-3)
    first_two = domain_losses(model, data, max_sequences=2)
    with torch.no_grad():
        x = data.data["a"][:2]
        assert first_two["a"] == pytest.approx(next_token_loss(model(x), x).item(), abs=1e-6)


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = ours_from_hf(tiny_hf_model())
    losses = domain_losses(model, InMemory(), batch_size=2)
    if rank == 0:
        torch.save(losses, out_file)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_result(tmp_path):
    # 5 and 3 sequences over 2 ranks: uneven shares, one rank pads with a zero-weight batch.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_worker, args=(2, tmp_path / "init", tmp_path / "out.pt"), nprocs=2, join=True)
    model = ours_from_hf(tiny_hf_model())
    assert torch.load(tmp_path / "out.pt") == pytest.approx(domain_losses(model, InMemory()), abs=1e-6)
