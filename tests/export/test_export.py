"""Export: exact-shape HF checkpoints that reload strictly and compute what the masked model computes."""

import json

import pytest
import torch
from helpers import PRUNE_CASES as CASES
from helpers import ours_from_hf, tiny_hf_model, token_batch

from sheared.cli import main
from sheared.export import export_model
from sheared.model import Source
from sheared.model.families import get_family
from sheared.pruning import L0Module, TargetShape


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_equivalence(case, tmp_path):
    source_kwargs, shape = CASES[case]
    hf = tiny_hf_model(**source_kwargs)
    model = ours_from_hf(hf)
    target = TargetShape(*shape)
    l0 = L0Module(model.args, target)
    with torch.no_grad():
        for p in l0.log_alpha.values():
            p.normal_(0, 2, generator=torch.Generator().manual_seed(1))
    masks = l0.deterministic("target")
    source = Source(
        model=model, tokenizer=None, family=get_family(model.args.family), hf_config=hf.config, path=tmp_path
    )
    report = export_model(model, masks, tmp_path / "out", source=source, ids=token_batch(seq=20))

    assert report["verified"] and report["max_abs_logit_diff"] <= 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
    ) == shape
    assert config["head_dim"] == 12 and config["tie_word_embeddings"] == hf.config.tie_word_embeddings


def test_export_that_does_not_match_is_reported(tmp_path, monkeypatch):
    from sheared.export import ExportVerificationError, export
    from sheared.pruning import compaction

    hf = tiny_hf_model(family="llama", heads=6, kv_heads=3)
    model = ours_from_hf(hf)
    l0 = L0Module(model.args, TargetShape(2, 40, 4, 2, 64))
    real = compaction.slice_state_dict

    def wrong_rows(state, args, kept):  # e.g. the reference's double-scaled lm_head: any slip shows
        out = real(state, args, kept)
        out["model.norm.weight"] = out["model.norm.weight"] * 1.01
        return out

    monkeypatch.setattr(export, "slice_state_dict", wrong_rows)
    source = Source(
        model=model, tokenizer=None, family=get_family("llama"), hf_config=hf.config, path=tmp_path
    )
    with pytest.raises(ExportVerificationError, match="differs from the model"):
        export_model(model, l0.deterministic("target"), tmp_path / "out", source=source, ids=token_batch())
    assert not json.loads((tmp_path / "out" / "export_report.json").read_text())["verified"]


@pytest.fixture
def pruned_run(tiny_config, tmp_path):
    from sheared.train.loop import run

    run(
        tiny_config(  # the paper's controller, which is far from the target after 4 steps (the warning)
            "train.steps=4",
            "train.save_interval=2",
            "train.eval_interval=2",
            "data.max_eval_sequences=2",
            "pruning.controller=lagrangian",
        ),
        tmp_path / "run",
        progress=False,
    )
    return tmp_path / "run"


def test_export_cli_from_a_pruning_run(pruned_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(pruned_run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "verified: strict reload" in captured.out
    assert "far from the target" in captured.err  # 4 steps cannot reach it; the gap is reported
    report = json.loads((out / "export_report.json").read_text())
    assert report["exported_shape"]["num_hidden_layers"] == 3 and report["step"] == 4
    assert report["exported_num_params"] == report["masks_num_params"]
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "sheared_run_state.json",
    } <= {p.name for p in out.iterdir()}
    assert "sheared export" in (out / "README.md").read_text()

    before = (out / "model.safetensors").read_bytes()
    assert main(["export", str(pruned_run), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    # An earlier checkpoint, replacing the previous export on purpose.
    assert (
        main(["export", str(pruned_run / "checkpoints" / "step_000002"), "--out", str(out), "--force"]) == 0
    )
    assert json.loads((out / "export_report.json").read_text())["step"] == 2


def test_export_never_writes_into_the_source_or_over_other_files(pruned_run, tiny_assets, tmp_path, capsys):
    assert main(["export", str(pruned_run), "--out", str(tiny_assets / "source" / "sub")]) == 2
    assert "never written" in capsys.readouterr().err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(pruned_run), "--out", str(other), "--force"]) == 2
    assert "holds no previous export" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_bf16_export_verifies(pruned_run, tmp_path):
    from sheared.export import export_run

    report = export_run(pruned_run, tmp_path / "bf16", dtype="bfloat16")
    assert report["verified"] and report["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
