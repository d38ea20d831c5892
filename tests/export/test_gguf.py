"""GGUF export: written from a HF directory, read back by our reader and by transformers' GGUF loader
with the logits of the HF model (f32 exact, f16/q8_0 within their tolerances), renamed into place only
once verified; and, when `llama-cpp-python` is installed, run by llama.cpp itself."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from helpers import BPE_CHAT_TEMPLATE, tiny_hf_model, train_bpe_tokenizer
from tokenizers import Regex

from sheared.cli import main
from sheared.errors import UserError
from sheared.export import REPORT_FILE
from sheared.export import gguf as gguf_export
from sheared.export.gguf import (
    GGUFTolerance,
    GGUFVerificationError,
    add_gguf_to_export,
    export_gguf,
    gguf_path,
    rope_freq_factors,
)
from sheared.export.gguf import layout as gguf_layout
from sheared.export.gguf import vocabulary as gguf_vocabulary
from sheared.model import args_from_hf_config, load_source, load_tokenizer
from sheared.model.gguf_file import _unpermute_rotary, permute_rotary

BPE_VOCAB = 300  # ids the tiny tokenizer uses
VOCAB = 320  # embedding rows: ids 300..319 must become [PAD] tokens
CHAT_TEMPLATE = BPE_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE tokenizer (GPT-2 splitting), trained offline on the public-domain texts."""
    return train_bpe_tokenizer(BPE_VOCAB)


def _hf_dir(path, tokenizer, family="llama", seed=0, **config):
    """A tiny random HF model (hidden 64, head_dim 16, intermediate 96: whole Q8_0 blocks) and the tokenizer."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, head_dim=16, eos_token_id=2)
    model = tiny_hf_model(family, seed=seed, **{**shape, **config})
    with torch.no_grad():  # small weights, like a trained model's, so that logits stay in a realistic range
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _hf_config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


CASES = {
    # name: (family, config, type); heads * head_dim != hidden in the MHA case
    "llama-mha-untied-f32": ("llama", dict(heads=2, kv_heads=2), "f32"),
    "llama-gqa-tied-f16": ("llama", dict(heads=4, kv_heads=2, tied=True), "f16"),
    "llama-gqa-untied-q8_0": ("llama", dict(heads=4, kv_heads=1), "q8_0"),
    # Mistral without a sliding window is llama.cpp's llama architecture.
    "mistral-gqa-f32": ("mistral", dict(heads=4, kv_heads=2, sliding_window=None), "f32"),
}
# (MHA with tied embeddings and q8_0 is `test_metadata_vocabulary_and_tensor_types`.)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_matches_the_hf_model(case, bpe_tokenizer, tmp_path):
    family, config, gguf_type = CASES[case]
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, family, **config)
    entry = export_gguf(model_dir, gguf_type)
    path = gguf_path(model_dir, gguf_type)
    assert entry["path"] == str(path) and path.is_file() and entry["bytes"] == path.stat().st_size
    assert not list(model_dir.glob("*.tmp")) and not list(model_dir.glob("*.unverified"))
    assert entry["verified"] and entry["problems"] == [] and entry["weights_exact"]
    tol = gguf_export.TOLERANCES[gguf_type]
    theirs = entry["transformers_loader"]
    assert theirs["ok"] and theirs["tokenizer_matches"] and theirs["max_abs_logit_diff_vs_rounded"] == 0.0
    if gguf_type == "f32":  # the same weights through the same code: bit for bit
        assert entry["max_abs_logit_diff"] == 0.0 and theirs["max_abs_logit_diff"] == 0.0
    else:  # rounded weights: a real, small difference, the same through both readers
        assert 0 < entry["max_abs_logit_diff"] <= entry["allowed_logit_diff"]
        assert entry["loss_rel_diff"] <= tol.loss_rel_diff
        assert theirs["max_abs_logit_diff"] <= theirs["allowed_logit_diff"]

    # Our reader, as a source: the same shape, and logits within the tolerance of the HF model's.
    args = args_from_hf_config(_hf_config(model_dir))
    source = load_source(path, with_tokenizer=False)
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
    ):
        assert getattr(source.args, key) == getattr(args, key)
    ids = torch.randint(0, BPE_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_source(model_dir, with_tokenizer=False).model(ids)
        diff = (source.model(ids) - expected).abs().max().item()
    assert diff <= tol.allowed_logit_diff(expected.abs().max().item())


def test_metadata_vocabulary_and_tensor_types(bpe_tokenizer, tmp_path):
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, heads=2, kv_heads=2, tied=True, hidden_size=48)
    entry = export_gguf(model_dir, "q8_0")
    assert entry["verified"] and entry["tensor_types"] == {"f32": 5, "f16": 11, "q8_0": 4}
    fields, tensors = _fields(gguf_path(model_dir, "q8_0"))
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.block_count": 2,
        "llama.context_length": 128,
        "llama.embedding_length": 48,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,  # not 48 / 2: head_dim is written, not derived
        "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]
    assert tokens[BPE_VOCAB:] == [f"[PAD{i}]" for i in range(BPE_VOCAB, VOCAB)]
    assert set(types[BPE_VOCAB:]) == {int(gguf.TokenType.UNUSED)}
    assert set(types[3:BPE_VOCAB]) == {int(gguf.TokenType.NORMAL)}
    spec = json.loads(bpe_tokenizer.backend_tokenizer.to_str())
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]

    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 2 * 9
    q8, f16, f32 = (
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.F32,
    )
    assert tensors["output_norm.weight"].tensor_type == f32
    assert tensors["blk.1.attn_norm.weight"].tensor_type == f32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == q8  # rows of 96 = 3 blocks of 32
    assert tensors["blk.0.attn_output.weight"].tensor_type == q8  # rows of 2 * 16
    assert tensors["token_embd.weight"].tensor_type == f16  # rows of 48: no whole blocks, f16 instead
    assert tensors["blk.0.attn_q.weight"].tensor_type == f16
    assert list(tensors["blk.0.attn_k.weight"].shape) == [48, 32]  # GGUF lists the fastest dimension first


def test_q_and_k_rows_are_in_llama_cpp_rotary_order():
    # One head of dim 4: HF rotates row i with row i + 2 (halves), llama.cpp rows 2i with 2i + 1 (pairs).
    w = torch.arange(8.0).reshape(8, 1)  # two heads
    assert permute_rotary(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(6 * 16, 5)
    assert torch.equal(_unpermute_rotary(permute_rotary(w, 6), 6), w)


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_rope_scaling(rope, bpe_tokenizer, tmp_path):
    params = {"rope_type": rope, "rope_theta": 10000.0, "factor": 4.0}
    if rope == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, heads=4, kv_heads=2, rope_parameters=params)
    entry = export_gguf(model_dir, "f32")
    assert entry["verified"] and entry["max_abs_logit_diff"] == 0.0
    assert entry["transformers_loader"]["ok"] is None  # it reads no RoPE scaling for llama
    fields, tensors = _fields(gguf_path(model_dir, "f32"))
    if rope == "linear":
        assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
        assert "rope_freqs.weight" not in tensors
    else:
        factors = np.asarray(tensors["rope_freqs.weight"].data)
        args = args_from_hf_config(_hf_config(model_dir))
        assert np.array_equal(factors, rope_freq_factors(args).numpy())
        # wavelength 2π < 32 / 4 kept (1), above 32 / 1 divided by `factor` (4), a ramp between
        assert factors[0] == 1.0 and factors[-1] == pytest.approx(4.0) and len(set(factors.tolist())) > 2


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_q_and_k_rows_left_in_hf_order_fail_verification(gguf_type, bpe_tokenizer, tmp_path, monkeypatch):
    """A layout mistake fails even where rounding would hide it in the logits (near-uniform attention)."""
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, heads=4, kv_heads=2)
    monkeypatch.setattr(gguf_layout, "permute_rotary", lambda w, num_heads: w)
    with pytest.raises(
        GGUFVerificationError,
        match=r"other weights than the rounded HF ones: .*k_proj.*transformers' GGUF loader",
    ):
        export_gguf(model_dir, gguf_type)
    assert not gguf_path(model_dir, gguf_type).exists()


def test_failed_verification_leaves_no_finished_file(bpe_tokenizer, tmp_path, monkeypatch, capsys):
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, heads=4, kv_heads=2)
    (model_dir / REPORT_FILE).write_text('{"verified": true}\n')  # what `sheared export` leaves
    monkeypatch.setitem(
        gguf_export.TOLERANCES, "f16", GGUFTolerance(logit_atol=0.0, logit_rtol=0.0, loss_rel_diff=0.0)
    )
    with pytest.raises(
        GGUFVerificationError, match=r"model-f16.gguf.unverified failed verification: our GGUF"
    ):
        add_gguf_to_export(model_dir, "f16")
    assert not gguf_path(model_dir, "f16").exists() and not list(model_dir.glob("*.tmp"))
    assert (model_dir / "model-f16.gguf.unverified").is_file()
    assert json.loads((model_dir / REPORT_FILE).read_text()) == {"verified": True}
    assert main(["export", str(model_dir), "--gguf"]) == 2
    err = capsys.readouterr().err  # transformers' progress bars, then one line
    assert err.endswith("\n") and "Traceback" not in err
    assert err.splitlines()[-1].startswith("sheared: error: GGUF export failed verification")


def test_cli_adds_a_gguf_to_an_export(bpe_tokenizer, tmp_path, capsys):
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, heads=4, kv_heads=2)
    (model_dir / REPORT_FILE).write_text('{"verified": true}\n')
    assert main(["export", str(model_dir), "--gguf-type", "f16"]) == 0
    out = capsys.readouterr().out
    assert f"gguf: {model_dir / 'model-f16.gguf'} (f16," in out and "transformers' GGUF loader" in out
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["verified"] is True and report["gguf"]["type"] == "f16" and report["gguf"]["verified"]
    before = gguf_path(model_dir, "f16").read_bytes()
    # A second time: refused without --force (nothing replaced), replaced with it.
    assert main(["export", str(model_dir), "--gguf"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(model_dir), "--gguf", "--force"]) == 0
    assert gguf_path(model_dir, "f16").read_bytes() == before  # deterministic


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        (
            "qwen2",
            {},
            r"family 'qwen2' is not llama.cpp's llama architecture .*supported families: llama, mistral",
        ),
        ("qwen3", {}, r"family 'qwen3' is not llama.cpp's llama architecture"),
        ("mistral", {"sliding_window": 16}, r"sliding_window=16 .*supported: sliding_window null"),
    ],
)
def test_unsupported_family_is_one_line_exit_2(family, config, message, bpe_tokenizer, tmp_path, capsys):
    model_dir = _hf_dir(tmp_path / "m", bpe_tokenizer, family, heads=4, kv_heads=2, **config)
    (model_dir / REPORT_FILE).write_text("{}\n")
    with pytest.raises(UserError, match=message):
        export_gguf(model_dir, "f16")
    capsys.readouterr()
    assert main(["export", str(model_dir), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sheared: error: GGUF export of") and err.count("\n") == 1
    assert not list(model_dir.glob("*.gguf*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gguf-type", "q4_k"], "sheared: error: --gguf-type must be one of f32, f16, q8_0, got 'q4_k'\n"),
        (["--gguf"], "sheared: error: --out is required: the new folder the export is written to\n"),
    ],
)
def test_bad_gguf_arguments_are_one_line_exit_2(argv, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["export", str(run), *argv]) == 2
    assert capsys.readouterr().err == message
    assert list(tmp_path.iterdir()) == [run] and not list(run.iterdir())


@pytest.mark.slow  # the tiny pruned run and a 49,152-token vocabulary: about a minute
def test_run_export_with_gguf_real_vocabulary(tiny_export, tmp_path, capsys):
    """`sheared export RUN --out DIR --gguf-type q8_0` on the tiny pruned run (SmolLM2's tokenizer)."""
    run = tiny_export.parent / "run"
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--gguf-type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    entry = report["gguf"]
    assert entry["path"] == str(out / "model-q8_0.gguf") and f"gguf: {entry['path']}" in printed
    assert entry["verified"] and entry["verification_tokens"] == report["verification_tokens"]  # the same ids
    assert entry["max_abs_logit_diff"] <= entry["allowed_logit_diff"]
    assert entry["transformers_loader"]["ok"] and entry["transformers_loader"]["tokenizer_matches"]
    assert entry["tokenizer_pre"] == "gpt-2"
    fields, tensors = _fields(out / "model-q8_0.gguf")
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and len(fields["tokenizer.ggml.merges"]) > 48000
    assert fields["tokenizer.chat_template"] == (out / "chat_template.jinja").read_text()
    assert fields["llama.attention.key_length"] == 16 and fields["llama.embedding_length"] == 48
    assert "output.weight" not in tensors


# --- llama.cpp itself ----------------------------------------------------------------------------

# llama.cpp against our decoder holding the same file's weights (dequantized by our reader), in
# next-token log-probabilities, with a float32 KV cache. Its CPU kernels compute in float32 but
# convert activations to f16 (f16 weights) or to 8-bit blocks (q8_0 weights) before a matmul.
# Measured on the tiny pruned model, 2 x 64 tokens: f32 3.8e-7, f16 1.9e-4, q8_0 1.0e-3 (f32 on
# SmolLM2-135M: 8.2e-5).
LLAMA_CPP_LOGPROB_ATOL = {"f32": 1e-4, "f16": 3e-3, "q8_0": 1e-2}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_gguf(gguf_type, tiny_export, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'sheared[llamacpp]')"
    )
    from sheared.eval.texts import REAL_TEXTS

    model_dir = tmp_path / "export"
    shutil.copytree(tiny_export, model_dir)
    export_gguf(model_dir, gguf_type)
    path = gguf_path(model_dir, gguf_type)
    ours = load_source(path, with_tokenizer=False)  # our reader: the same weights llama.cpp gets
    tokenizer = load_tokenizer(model_dir)  # the export's own
    f32 = llama_cpp.GGML_TYPE_F32  # a float32 KV cache (the default f16 one rounds keys and values)
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=128, type_k=f32, type_v=f32, verbose=False
    )
    for text in REAL_TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:64]
        # the vocabulary, merges and pre-tokenizer: llama.cpp splits the text as transformers does
        assert llm.tokenize(text.encode(), add_bos=False, special=False)[:64] == ids
        llm.reset()
        llm.eval(ids)
        theirs = torch.log_softmax(torch.from_numpy(np.array(llm.scores[: len(ids)])).double(), dim=-1)
        with torch.no_grad():
            expected = torch.log_softmax(ours.model(torch.tensor([ids]))[0].double(), dim=-1)
        diff = (theirs - expected).abs().max().item()
        print(f"llama.cpp {gguf_type}: max |next-token log-prob diff| {diff:.2e} over {len(ids)} tokens")
        assert diff <= LLAMA_CPP_LOGPROB_ATOL[gguf_type]
        assert torch.equal(theirs.argmax(-1), expected.argmax(-1))
    llm.close()


@pytest.mark.parametrize(
    ("name", "pre_tokenizer"),
    [
        ("gpt-2", lambda pt: pt.ByteLevel(add_prefix_space=False)),
        (
            "smollm",
            lambda pt: pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        ),
        (
            "llama-bpe",
            lambda pt: pt.Sequence(
                [
                    pt.Split(Regex(gguf_export.LLAMA3_SPLIT), behavior="isolated"),
                    pt.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
        ),
        (None, lambda pt: pt.ByteLevel(add_prefix_space=True)),  # no llama.cpp name: llama.cpp's default
    ],
)
def test_pre_tokenizer_names(name, pre_tokenizer, bpe_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers import pre_tokenizers as pt

    tok = Tokenizer.from_str(bpe_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizer(pt)
    assert (
        gguf_export.PRE_TOKENIZERS.get(gguf_vocabulary._pre_tokenizer_signature(json.loads(tok.to_str())))
        == name
    )


def test_a_sentencepiece_vocabulary_is_refused():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "▁a": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    with pytest.raises(
        UserError, match=r"supports byte-level BPE tokenizers .*this one is a BPE model with Metaspace"
    ):
        gguf_export.gguf_vocab(PreTrainedTokenizerFast(tokenizer_object=tok), 6, 1, 2)
