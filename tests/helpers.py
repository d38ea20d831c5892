"""Shared test helpers: tiny random Hugging Face models of every family, seeded; torchrun helpers."""

from __future__ import annotations

import os
import socket

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sheared.model import CausalLM, ModelArgs, args_from_hf_config

VOCAB = 97

# Real shapes for counting tests (SPEC §1 and §3): no weights are built from them.
LLAMA2_7B = ModelArgs(
    family="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
)
# 30 layers, hidden 576, 9 heads in 3 KV groups, head_dim 64, intermediate 1536, tied.
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


def tiny_hf_config(family: str = "llama", *, heads: int = 6, kv_heads: int = 3, tied: bool = False, **extra):
    """A tiny HF config: 2 layers, hidden 48, head_dim 12 (so heads * head_dim != hidden)."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=12,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(extra)
    return AutoConfig.for_model(family, **values)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise large enough to make logits differ clearly.

    Norm weights become 1 + noise so that their order matters too.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def tiny_hf_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A tiny HF model of `family` in eval mode, fp32, randomized with `seed`."""
    config = tiny_hf_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_(model, seed).eval()


def ours_from_hf(hf_model) -> CausalLM:
    """Our decoder with the weights of an HF model (strict state-dict load)."""
    model = CausalLM(args_from_hf_config(hf_model.config))
    state = hf_model.state_dict()
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=True)
    return model.eval()


def token_batch(batch: int = 2, seq: int = 24, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Tiny sources: 2 layers, hidden 48, intermediate 80, head_dim 12. Targets (L, d, H, G, I).
PRUNE_CASES = {
    # MHA: the KV-group mask is the per-head mask; layers, hidden, intermediate all pruned.
    "llama-mha": (dict(family="llama", heads=6, kv_heads=6), (1, 40, 4, 4, 56)),
    # GQA 2: whole KV groups dropped (3 -> 1), heads per group kept; layers and intermediate as the source.
    "llama-gqa2-untied-drop-groups": (dict(family="llama", heads=6, kv_heads=3), (2, 48, 2, 1, 80)),
    # GQA 3: heads within groups dropped (3 -> 1 per group), groups kept, hidden pruned.
    "llama-gqa3-tied-drop-heads": (dict(family="llama", heads=6, kv_heads=2, tied=True), (2, 32, 2, 2, 80)),
    # Both levels at once, with q/k/v biases following their heads.
    "qwen2-bias-groups-and-heads": (dict(family="qwen2", heads=6, kv_heads=3, tied=True), (1, 36, 2, 1, 40)),
    # Per-head q/k norms stay with the kept heads.
    "qwen3-qknorm": (dict(family="qwen3", heads=6, kv_heads=2), (2, 44, 2, 1, 72)),
    # Only the hidden size shrinks.
    "mistral-hidden-only": (
        dict(family="mistral", heads=6, kv_heads=2, sliding_window=None),
        (2, 24, 6, 2, 80),
    ),
}


def free_port() -> int:
    """A free TCP port on localhost for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """This environment for torchrun children, one thread each (two ranks share 2 cores)."""
    return {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "OMP_NUM_THREADS": "1"}


BPE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def train_bpe_tokenizer(vocab_size: int):
    """A real byte-level BPE tokenizer (GPT-2 splitting) of `vocab_size` ids, trained offline on the
    public-domain texts, with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sheared.eval.texts import REAL_TEXTS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(REAL_TEXTS), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = BPE_CHAT_TEMPLATE
    return fast


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes (what "byte-identical afterwards" compares)."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
