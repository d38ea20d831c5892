"""Config system: strict typed loading, nearest-key suggestions, dotted overrides, round trip."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from sheared.config import config_from_dict, field_docs, load_config, parse_overrides, save_config
from sheared.errors import UserError


@dataclass
class Optim:
    """Toy optimizer section."""

    lr: float = 1e-4
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")


@dataclass
class Run:
    """Toy run config."""

    steps: int = 10
    """Steps."""
    optim: Optim = field(default_factory=Optim)
    """Optimizer."""
    mode: Literal["ddp", "fsdp"] = "ddp"
    """Parallelism."""
    name: str | None = None
    """Optional name."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-domain weights."""


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3e-4\nweights: {a: 0.5, b: 0.5}\n")
    cfg = load_config(Run, path, ["optim.betas=[0.8, 0.9]", "mode=fsdp", "steps=1e3"])
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.mode == "fsdp" and cfg.weights == {"a": 0.5, "b": 0.5}


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        load_config(Run, None, ["optim.lrr=1"])
    with pytest.raises(UserError, match=r"unknown config key 'step'; did you mean 'steps'\?"):
        config_from_dict(Run, {"step": 3})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=abc", r"config key 'steps': expected an integer, got 'abc'"),
        ("steps=1.5", r"config key 'steps': expected an integer, got 1.5"),
        ("optim.lr=true", r"config key 'optim.lr': expected a number, got True"),
        ("mode=tp", r"config key 'mode': 'tp' is not one of 'ddp', 'fsdp'"),
        ("optim.lr=-1", r"optim: lr must be positive, got -1.0"),
        ("optim.betas=0.9", r"config key 'optim.betas': expected a list"),
        ("steps", r"override 'steps' is not of the form key.sub=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(UserError, match=message):
        load_config(Run, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(UserError, match=r"is not valid YAML"):
        load_config(Run, tmp_path / "bad.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.5", "name=x", "weights.code=1.0"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.5
    assert load_config(Run, path) == cfg


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


def _config_classes():
    from sheared.demo import DemoConfig
    from sheared.model.args import ModelArgs

    return [DemoConfig, ModelArgs]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
