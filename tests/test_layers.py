"""The house's floors: no module imports from a floor above its own, and no import cycles.

errors/config/files < model < pruning < data < eval < train < export, report < demo, cli
(`data` may read a tokenizer through `sheared.model.loading`; nothing else of the model).
"""

from __future__ import annotations

import ast
from pathlib import Path

import sheared

ROOT = Path(sheared.__file__).parent
FLOORS = {
    "errors": 0,
    "config": 0,
    "files": 0,
    "hardware": 0,
    "precision": 0,
    "model": 1,
    "pruning": 2,
    "data": 3,
    "eval": 4,
    "train": 5,
    "export": 6,
    "report": 6,
    "demo": 7,
    "study": 7,
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}
ALLOWED_UPWARD = {("data", "sheared.model.loading"), ("data", "sheared.model")}  # load_tokenizer only


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
MODULE_NAMES = set(MODULES)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sheared"):
            # `from package import submodule` imports the submodule, not the package's __init__
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULE_NAMES
            found.update(subs or {node.module})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sheared"))
    return found


def test_every_room_has_a_floor():
    assert {_room(m) for m in MODULES} <= set(FLOORS)


def test_no_import_from_a_higher_floor():
    upward = []
    for module, path in MODULES.items():
        room = _room(module)
        for imported in _imports(path, top_level_only=False):
            if imported == "sheared":
                continue
            target = _room(imported)
            if FLOORS[target] > FLOORS[room] and (room, imported) not in ALLOWED_UPWARD:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_eval_imports_nothing_above_it():
    for module, path in MODULES.items():
        if _room(module) == "eval":
            assert not {_room(i) for i in _imports(path, False)} & {
                "train",
                "report",
                "export",
                "demo",
                "cli",
            }


def test_no_import_cycles():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*stack, module, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
