"""Typed configs: dataclasses with a docstring on every field, strict YAML loading, dotted overrides.

A config class is a plain dataclass whose fields carry type hints and a docstring each (the
string literal right below the field), and which validates itself in `__post_init__` by raising
`UserError`. This module turns YAML + command-line overrides into such objects:

    cfg = load_config(PruneConfig, "configs/tiny/prune.yaml", ["optim.lr=3e-4", "seed=1"])

- unknown keys are refused, naming the key and the nearest valid one;
- values are converted to the field's type (so `3e-4`, which YAML reads as a string, is a float),
  or refused with the key, the value and the expected type;
- the resolved config is written back with `save_config` into every run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sheared.errors import UserError
from sheared.files import atomic_write

T = TypeVar("T")


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}(valid: {', '.join(valid)})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (a field's type hint), or a UserError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(
            errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} is not a {_type_name(tp)}"
        )
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise UserError(f"config key {key!r}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"config key {key!r}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return config_from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, int | float | str):
            try:
                number = float(value) if tp is float else _to_int(value)
            except ValueError:
                pass
            else:
                return number
        raise UserError(
            f"config key {key!r}: expected {'an integer' if tp is int else 'a number'}, got {value!r}"
        )
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key!r}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise UserError(f"config key {key!r}: expected a path, got {value!r}")
    raise TypeError(f"config key {key!r}: unsupported field type {tp!r}")  # a bug in a config class


def _to_int(value: int | float | str) -> int:
    if isinstance(value, int):
        return value
    number = float(value)  # accepts "1e6" and "1_000"
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly (unknown keys and bad types are refused).

    Args:
        cls: a config dataclass.
        data: its values; missing keys take the field defaults.
        where: dotted path of this section, for messages.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"config section {where or '(top level)'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            full = f"{where}.{key}" if where else str(key)
            prefix = f"{where}." if where else ""
            raise UserError(f"unknown config key {full!r}; {_suggest(full, [prefix + n for n in names])}")
    values = {}
    for f in fields:
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"config key {(where + '.' if where else '') + f.name!r} is required")
    try:
        return cls(**values)
    except UserError as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Nested dict from `key.sub=value` strings; values are read as YAML scalars (`true`, `[1, 2]`)."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise UserError(
                f"override {item!r}: {raw!r} is not a YAML value ({problem}); quote strings, close brackets"
            ) from None
        node = result
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[last] = value
    return result


def merge(base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line error."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {str(p)!r} is a directory; give a YAML file (e.g. {p}/prune.yaml)")
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Config `cls` from a YAML file (optional) with dotted `key=value` overrides applied on top."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(cls, merge(data, parse_overrides(overrides)))


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, strings, numbers) of a config object."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda f: yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal under the field in the class body)."""
    import ast
    import inspect
    import itertools
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs
