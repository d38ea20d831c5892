"""bench/profile_step.py on its --tiny path, in-process on the CPU: the category breakdown accounts for the
measured step, and only the pruning step spends time on masks, the L0 module and the Lagrangian."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_profile_accounts_for_the_step(tmp_path):
    script = _load_script()
    result = script.main(
        ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    )
    kinds = result["kinds"]
    for kind in script.KINDS:
        k = kinds[kind]
        categories = k["categories_ms"]
        assert sum(categories.values()) == pytest.approx(k["measured_step_ms"], rel=0.05), kind
        assert all(v >= 0 for v in categories.values()), categories
        for busy in (script.MATMUL, script.ATTENTION, script.LOSS_CAT, script.OPTIMIZER_CAT):
            assert categories.get(busy, 0.0) > 0, (kind, busy)
        assert k["wall_ms"] > 0 and k["top_ops"]
    assert kinds["pruning"]["categories_ms"].get(script.MASK_CAT, 0.0) > 0
    assert kinds["plain"]["categories_ms"].get(script.MASK_CAT, 0.0) == 0
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["pruning_minus_plain_ms"][script.MASK_CAT] > 0
    assert {k["trace"] for k in saved["kinds"].values()} <= {p.name for p in tmp_path.iterdir()}
