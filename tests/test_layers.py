"""The house's floors: no module imports from a floor above its own, and no import cycles.

errors/config/files/run_dir < model < pruning < data < eval < train < export, report < demo, cli
(`data` may read a tokenizer through `sheared.model.loading`; nothing else of the model).

A run directory is read through `sheared.run_dir` alone: no other module spells one of its file
names, and the rooms above the trainer import it only for its configs (and demo/study to run it).
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
    "run_dir": 0,
    "model": 1,
    "pruning": 2,
    "data": 3,
    "eval": 4,
    "train": 5,
    "export": 6,
    "report": 6,
    "demo": 7,
    "study": 7,
    "pipeline": 7,
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


# --- the run directory ------------------------------------------------------------------------------

# The file names of a run directory (and of its checkpoints) that only sheared/run_dir.py may spell.
# `masks`, `report` and `tensorboard` are left out: they are ordinary words (dict keys, prose).
RUN_FILE_NAMES = {
    "CONFIG_FILE": "config.yaml",
    "RESUME_CONFIG": "config.resume-{}.yaml",
    "METRICS_FILE": "metrics.jsonl",
    "METRICS_DAMAGED": "metrics.damaged.jsonl",
    "CHECKPOINT_DIR": "checkpoints",
    "MASKS_FILE": "masks.pt",
    "MASKS_SUMMARY": "masks.json",
    "SCORES_FILE": "scores.pt",
    "TARGET_SEARCH_FILE": "target_search.json",
    "FINAL_STATE_FILE": "final_state.json",
    "RUN_STATE_FILE": "sheared_run_state.json",
    "TRAINER_STATE": "trainer_state.json",
    "MANIFEST": "manifest.json",
}
# The study's own output folder holds its config.yaml; it is not a run directory.
ALLOWED_LITERALS = {("sheared.study", "config.yaml")}


def test_the_file_names_checked_are_run_dirs_own():
    import sheared.run_dir as run_dir

    assert {name: getattr(run_dir, name) for name in RUN_FILE_NAMES} == RUN_FILE_NAMES


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (or other bare string statements)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _spells(text: str, name: str) -> bool:
    """Whether a string literal is `name` or a path with `name` as one of its parts (prose with
    spaces, such as an error message that mentions a file, does not count)."""
    return text == name or (" " not in text and name in text.split("/"))


def run_file_literals(path: Path) -> list[tuple[int, str]]:
    """(line, literal) of every string literal of a module that spells a run directory's file name."""
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    found = {
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and any(_spells(node.value, name) for name in RUN_FILE_NAMES.values())
    }
    return sorted(found)


def test_only_run_dir_spells_a_run_directory_file_name():
    spelled = [
        f"{module} line {line}: {text!r}"
        for module, path in MODULES.items()
        if module != "sheared.run_dir"
        for line, text in run_file_literals(path)
        if (module, text) not in ALLOWED_LITERALS
    ]
    assert spelled == []


def test_the_literal_check_sees_paths_and_not_prose(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        '"""Reads metrics.jsonl."""\n'
        'A = "metrics.jsonl"\n'
        'B = f"{run}/checkpoints/step_1"\n'
        'C = "masks/masks.pt"\n'
        'D = "no metrics.jsonl here; is it a run?"\n'
        'E = "metrics.jsonl.bak"\n'
    )
    assert run_file_literals(source) == [
        (2, "metrics.jsonl"),
        (3, "/checkpoints/step_1"),
        (4, "masks/masks.pt"),
    ]


# rooms above the trainer -> what they may import of it (the configs; demo and study also run it,
# demo and pipeline under a deadline)
TRAINER_IMPORTS_ALLOWED = {
    "report": {"sheared.train.config"},
    "export": {"sheared.train.config"},
    "demo": {"sheared.train.config", "sheared.train.loop", "sheared.train.deadline"},
    "study": {"sheared.train.config", "sheared.train.loop"},
    "pipeline": {"sheared.train.config", "sheared.train.loop", "sheared.train.deadline"},
}


def test_the_rooms_above_the_trainer_read_runs_through_run_dir():
    found = []
    for module, path in MODULES.items():
        allowed = TRAINER_IMPORTS_ALLOWED.get(_room(module))
        if allowed is None:
            continue
        for imported in _imports(path, top_level_only=False):
            if (
                imported == "sheared.train" or imported.startswith("sheared.train.")
            ) and imported not in allowed:
                found.append(f"{module} imports {imported}")
    assert found == []
