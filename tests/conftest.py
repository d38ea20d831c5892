"""Fixtures of the training tests: the tiny source and prepared data, made once per session."""

from __future__ import annotations

import shutil

import pytest

from sheared.config import load_config
from sheared.data.prepare import ensure_prepared
from sheared.model.random_source import ensure_source
from sheared.train.config import PruneConfig

TINY_CONFIG = "configs/tiny/prune.yaml"


@pytest.fixture(scope="session")
def smollm2_tok():
    """The real SmolLM2 tokenizer (byte-level BPE, 49152 ids, <|endoftext|> = 0, no BOS), loaded once."""
    from sheared.errors import UserError
    from sheared.model import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except UserError as e:  # the demo extra is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A random tiny source and its prepared tiny data, shared read-only by the tests."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(
        PruneConfig,
        TINY_CONFIG,
        [
            f"source={root / 'source'}",
            f"data.path={root / 'prepared'}",
            f"data.auto_prepare.corpus_dir={root / 'corpus'}",
        ],
    )
    ensure_source(cfg.source_init, cfg.source)
    from sheared.model import load_source

    ensure_prepared(cfg.data.path, cfg.data.auto_prepare, load_source(cfg.source).tokenizer, cfg.source)
    return root


@pytest.fixture
def tiny_config(tiny_assets, tmp_path):
    """A function building the tiny PruneConfig (with overrides) on a private copy of the data."""

    def make(*overrides: str) -> PruneConfig:
        data = tmp_path / "prepared"
        if not data.exists():
            shutil.copytree(tiny_assets / "prepared", data)
        return load_config(
            PruneConfig,
            TINY_CONFIG,
            [f"source={tiny_assets / 'source'}", f"data.path={data}", "data.auto_prepare=null", *overrides],
        )

    return make


@pytest.fixture(scope="session")
def tiny_export(tiny_assets, tmp_path_factory):
    """The tiny source pruned for a few steps and exported (a small real HF model with run state)."""
    from sheared.export import export_run
    from sheared.train.loop import run

    root = tmp_path_factory.mktemp("tiny-export")
    shutil.copytree(tiny_assets / "prepared", root / "prepared")
    cfg = load_config(
        PruneConfig,
        TINY_CONFIG,
        [
            f"source={tiny_assets / 'source'}",
            f"data.path={root / 'prepared'}",
            "data.auto_prepare=null",
            "train.steps=20",
            "train.eval_interval=10",
            "train.save_interval=20",
            "data.max_eval_sequences=2",
        ],
    )
    run(cfg, root / "run", progress=False)
    export_run(root / "run", root / "export")
    return root / "export"
