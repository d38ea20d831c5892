"""Each decision is worked out in one place: the precision's dtypes in `sheared.precision`, the list of
shape fields in `sheared.model.args`. Read from the source, so a new room cannot quietly decide again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import sheared
from sheared.model.args import CONFIG_SHAPE_FIELDS, SHAPE_FIELDS, TARGET_FIELDS
from sheared.precision import Precision

ROOT = Path(sheared.__file__).parent
SOURCES = sorted(ROOT.rglob("*.py"))
REPO = ROOT.parents[1]
CALLERS = sorted([*(REPO / "bench").glob("*.py"), *(REPO / "tests").rglob("*.py")])  # no `bf16=` there
PRECISION_MODULE = ROOT / "precision.py"
SHAPE_MODULE = ROOT / "model" / "args.py"
DTYPES = {"bfloat16", "float32", "float16", "half", "bfloat"}


def _is_dtype(node: ast.AST) -> bool:
    """`torch.bfloat16`, `torch.float32`, ... (the attribute of the name `torch`)."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr in DTYPES
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    )


def precision_choices(tree: ast.AST) -> list[int]:
    """Lines that choose a dtype by a condition (`torch.bfloat16 if ... else ...`), or that take a
    `bf16` flag (a bool that some room would turn back into a dtype)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp) and (_is_dtype(node.body) or _is_dtype(node.orelse)):
            found.append(node.lineno)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            if any(a.arg == "bf16" for a in [*args.args, *args.kwonlyargs, *args.posonlyargs]):
                found.append(node.lineno)
        if isinstance(node, ast.keyword) and node.arg == "bf16":
            found.append(node.value.lineno)
    return found


def shape_lists(tree: ast.AST) -> list[int]:
    """Lines of tuple/list/set literals of three or more strings that are all shape field names."""
    names = set(CONFIG_SHAPE_FIELDS)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 3:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(values) == len(node.elts) and set(values) <= names:
                found.append(node.lineno)
    return found


def test_no_precision_choice_outside_the_precision_module():
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in SOURCES
        if path != PRECISION_MODULE
        for line in precision_choices(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_no_bf16_flag_is_passed_by_benchmarks_or_tests():
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in CALLERS
        if path != Path(__file__)
        for line in precision_choices(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_no_shape_field_list_outside_the_one_definition():
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in SOURCES
        if path != SHAPE_MODULE
        for line in shape_lists(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_checks_catch_what_they_look_for():
    """Each check fails on the kind of code it forbids (so the two tests above can fail)."""
    choice = ast.parse("dtype = torch.bfloat16 if bf16 else torch.float32")
    flag = ast.parse("def load(spec, bf16: bool): ...")
    passed = ast.parse("load(spec, bf16=True)")
    assert precision_choices(choice) == [1]
    assert precision_choices(flag) == [1]
    assert precision_choices(passed) == [1]
    assert precision_choices(ast.parse("x = torch.float32")) == []
    listed = ast.parse('KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size")')
    assert shape_lists(listed) == [1]
    assert shape_lists(ast.parse('x = ("hidden_size", "other", "vocab_size")')) == []


def test_the_one_definition_holds_the_target_fields():
    assert SHAPE_FIELDS[: len(TARGET_FIELDS)] == TARGET_FIELDS
    assert set(SHAPE_FIELDS) <= set(CONFIG_SHAPE_FIELDS)


CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    "name, device, sharded, autocast, param, teacher",
    [
        ("fp32", CPU, False, None, None, torch.float32),
        ("bf16", CPU, False, torch.bfloat16, torch.bfloat16, torch.float32),
        ("bf16", CPU, True, None, torch.bfloat16, torch.float32),
        ("bf16", CUDA, False, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        ("bf16", CUDA, True, None, torch.bfloat16, torch.bfloat16),
        ("fp32", CUDA, True, None, None, torch.float32),
    ],
)
def test_precision_dtypes(name, device, sharded, autocast, param, teacher):
    """The three dtypes of a run, from the one rule: autocast only where FSDP2 does not already
    compute in bf16; FSDP2 gathers bf16 parameters; the teacher is stored in bf16 on CUDA only."""
    p = Precision(name, "as configured", device.type, sharded)
    assert (p.autocast_dtype, p.param_dtype, p.teacher_dtype) == (autocast, param, teacher)
    assert p.reduce_dtype == torch.float32
    assert p.bytes_per_value == (2 if name == "bf16" else 4)
    assert Precision.resolve(name, CPU, "fsdp" if sharded else "ddp").sharded is sharded
