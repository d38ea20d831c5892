"""The embedded default source, SmolLM2-135M from its GGUF file, against transformers' GGUF loader."""

import json

import pytest
import torch

from sheared.cli import main
from sheared.eval.texts import AUSTEN, DARWIN
from sheared.model import load_source, save_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_source("smollm2-135m")


@pytest.fixture(scope="module")
def real_ids(smollm2):
    return smollm2.tokenizer(
        [AUSTEN, DARWIN[: len(AUSTEN)]], return_tensors="pt", truncation=True, max_length=96
    ).input_ids


def test_info_json(capsys):
    assert main(["info", "smollm2-135m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = {
        "family": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "num_params": 134_515_008,
    }
    assert {k: info[k] for k in expected} == expected
    assert info["num_params_embedding"] == 28_311_552


def test_parameter_count_matches_the_loaded_model(smollm2):
    assert smollm2.model.num_params() == 134_515_008


def test_logits_match_transformers_gguf_loader(smollm2, real_ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2.path.parent), gguf_file=smollm2.path.name).eval()
    with torch.no_grad():
        expected = hf(real_ids).logits
        actual = smollm2.model(real_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    # The model really models English: low loss on Austen (a random model would give ln(49152) ≈ 10.8).
    loss = torch.nn.functional.cross_entropy(actual[0, :-1], real_ids[0, 1:])
    assert loss < 4.0


def test_save_hf_round_trip_with_tokenizer(smollm2, real_ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_hf(
        smollm2.model, tmp_path / "smollm2", tokenizer=smollm2.tokenizer, base_config=smollm2.hf_config
    )
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(real_ids).logits, smollm2.model(real_ids), atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(AUSTEN).input_ids == smollm2.tokenizer(AUSTEN).input_ids
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
