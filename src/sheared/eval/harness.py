"""Bridge to EleutherAI's lm-evaluation-harness: benchmark a Hugging Face model directory, offline.

`run_lm_eval` runs lm-eval's `hf` model on named tasks (built-in ones, or ones defined by YAML
files in an `include_path` folder) and returns plain JSON-able results; `format_table` prints them.

Everything runs without network: for the duration of the call the Hugging Face offline switches
are on (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`, `TRANSFORMERS_OFFLINE`, and the flags that
`huggingface_hub` and `datasets` read from them when first imported), and everything is restored
afterwards. A built-in task therefore only runs when its dataset is already in the Hugging Face
cache; a local task reads its own files (`dataset_path: json` with `dataset_kwargs: {data_files:
...}`). `datasets` resolves relative `data_files` against the current directory, not against the
YAML file, so task YAMLs meant to run from anywhere should use absolute paths.

Written against lm-eval 0.4.13 (`TaskManager.load`, `include_defaults`).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sheared.errors import UserError
from sheared.eval.table import text_table

INSTALL_HINT = "pip install 'sheared[eval]'"
DTYPES = ("float32", "bfloat16", "float16", "auto")  # what lm-eval's `hf` model accepts as `dtype`
# Set while lm-eval runs; huggingface_hub and datasets also cache them at import, see `_offline`.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
NUM_SUGGESTIONS = 3  # close task names offered for an unknown one


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> dict:
    """Evaluate a Hugging Face model directory on lm-eval tasks, offline.

    Args:
        model_dir: a Hugging Face model directory (config.json, weights, tokenizer files).
        tasks: lm-eval task, group or tag names: built-in ones, or ones defined by YAML files in
            `include_path` (those take precedence over built-in tasks of the same name).
        include_path: folder scanned (recursively) for task YAML files.
        num_fewshot: few-shot examples per prompt (None = each task's default, 0 when it has none).
        limit: evaluate only the first `limit` documents of each task (a float below 1 is a
            fraction of them); None = all. For quick checks, not for reported numbers.
        batch_size: requests per forward pass.
        device: torch device of the model, e.g. `cpu` or `cuda:0`.
        dtype: dtype the weights are loaded in, one of `DTYPES`.
        seed: seeds Python, NumPy, torch and the few-shot sampler.

    Returns:
        A JSON-able dict:
        `tasks`: task (or group) -> {`metric,filter` -> value} as lm-eval names them (e.g.
            `acc,none` and `acc_stderr,none`), floats only: entries lm-eval reports as "N/A" or
            non-finite are dropped.
        `n_samples`: task -> {`original`: documents in the task, `effective`: documents evaluated}.
        `config`: what was run (the arguments, resolved, and the few-shot count of each task).
        `versions`: task -> task version, and the versions of lm-eval, transformers and torch.

    Raises:
        UserError: lm-eval is not installed, the model directory is not a Hugging Face model
            directory, a task name is unknown, its data is missing, or an argument is out of range.
    """
    names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))  # dedupe, keep order
    _check_arguments(names, include_path, num_fewshot, limit, batch_size, device, dtype)
    model_path = _check_model_dir(model_dir)
    include = None if include_path is None else str(Path(include_path).expanduser().resolve())
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"lm-eval is not installed ({e}); install the eval extra: {INSTALL_HINT}") from None

    # An absolute path also keeps lm-eval from asking the Hub for a "model_sha" of a repo id.
    model_args = {"pretrained": str(model_path), "dtype": dtype}
    with _offline(), _local_files_resolved(include) as readable:
        manager = _task_manager(TaskManager, names, readable, metadata=model_args)
        task_objects = _load_tasks(manager, names)
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=task_objects,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    assert raw is not None, "lm-eval returned no results (it only does so on non-zero ranks)"
    return _summarize(raw, names, model_path, include, num_fewshot, limit, batch_size, device, dtype, seed)


def format_table(results: dict) -> str:
    """A plain-text table of `run_lm_eval` results: task, metric, filter, n, value, stderr."""
    header = ("task", "metric", "filter", "n", "value", "stderr")
    rows = []
    n_samples = results.get("n_samples", {})
    for task, metrics in results["tasks"].items():
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                (
                    task,
                    metric,
                    filter_name,
                    "" if n is None else str(n),
                    f"{value:.4f}",
                    "" if stderr is None else f"{stderr:.4f}",
                )
            )
    return "\n".join(text_table(header, rows, right={3, 4, 5}, rule=True)) + "\n"


_PATH_VALUE = re.compile(r"^(\s*(?:-\s+|[\w.-]+:\s+))(['\"]?)([^'\"\s#]+)\2(\s*(?:#.*)?)$")


@contextlib.contextmanager
def _local_files_resolved(include: str | None) -> Iterator[str | None]:
    """`include` as lm-eval should read it: a copy in which every file path a task YAML gives relative
    to its own folder (`data_files`, `include`) is absolute. `datasets` resolves relative
    `data_files` against the current directory, so a task folder would work only from inside it."""
    if include is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sheared-tasks-") as tmp:
        copy = Path(tmp) / "tasks"
        shutil.copytree(include, copy, symlinks=False)
        for path in copy.rglob("*.y*ml"):
            folder = Path(include) / path.parent.relative_to(copy)
            lines = path.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                m = _PATH_VALUE.match(line.rstrip("\n"))
                if m is None or Path(m[3]).is_absolute() or "://" in m[3] or not (folder / m[3]).is_file():
                    continue
                lines[i] = f"{m[1]}{m[2]}{(folder / m[3]).resolve()}{m[2]}{m[4]}\n"
            path.write_text("".join(lines))
        yield str(copy)


def _check_arguments(
    names: list[str],
    include_path: str | Path | None,
    num_fewshot: int | None,
    limit: int | float | None,
    batch_size: int,
    device: str,
    dtype: str,
) -> None:
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"tasks must be a non-empty list of lm-eval task names, got {names!r}")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise UserError(f"include_path {str(include_path)!r} is not a folder of task YAML files")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not limit > 0:
        raise UserError(f"limit must be > 0 (a count, or a fraction below 1), got {limit}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} was asked for but CUDA is not available; use device 'cpu'")


def _check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser().resolve()
    if not path.exists():
        raise UserError(f"model directory {str(model_dir)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{str(model_dir)!r} is not a Hugging Face model directory (no config.json in it)")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"model directory {str(model_dir)!r} has no weights ({' or '.join(WEIGHT_PATTERNS)})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model directory {str(model_dir)!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "lm-eval needs the tokenizer saved next to the model"
        )
    return path


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Turn on the Hugging Face offline switches for the block (and skip lm-eval's git lookup), and
    restore them afterwards.

    The environment variables alone are not enough: `huggingface_hub.constants` and
    `datasets.config` read them once, at import, and transformers has imported the hub already.
    """
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    saved_flags: list[tuple[Any, str, Any]] = []
    try:
        import datasets.config
        import huggingface_hub.constants
        import lm_eval.evaluator

        # lm-eval runs `git describe` in the working directory for its results' metadata; outside a
        # git checkout git prints "fatal: not a git repository" twice. The hash is not needed here.
        for module, flag, value in (
            (huggingface_hub.constants, "HF_HUB_OFFLINE", True),
            (datasets.config, "HF_HUB_OFFLINE", True),
            (datasets.config, "HF_DATASETS_OFFLINE", True),
            (lm_eval.evaluator, "get_git_commit_hash", lambda: None),
        ):
            if hasattr(module, flag):
                saved_flags.append((module, flag, getattr(module, flag)))
                setattr(module, flag, value)
        yield
    finally:
        for module, flag, value in reversed(saved_flags):
            setattr(module, flag, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_manager(task_manager_cls, names: list[str], include: str | None, metadata: dict):
    """lm-eval's TaskManager for `names`; UserError naming the ones it does not know.

    Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so when every name is a plain task
    defined under `include`, only that folder is indexed (its tasks win over built-in ones of the
    same name anyway). Groups and tags may refer to built-in tasks, so they get the full index.
    """
    if include is not None:
        local = task_manager_cls(include_path=include, include_defaults=False, metadata=metadata)
        if all(name in local.all_subtasks for name in names):
            return local
    manager = task_manager_cls(include_path=include, metadata=metadata)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=NUM_SUGGESTIONS)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        local = f"defined by no YAML file under {include} and " if include else ""
        raise UserError(
            f"unknown lm-eval task {', '.join(hints)}: {local}not a built-in task, group or tag "
            "(list those with `lm-eval ls tasks`)"
        )
    return manager


def _load_tasks(manager, names: list[str]) -> list:
    """Build each named task (or group, or a tag's tasks), which loads its data.

    Loading the data here, before lm-eval loads the model, fails fast and with a clear message
    when a dataset is neither local nor in the Hugging Face cache.
    """
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except ConnectionError as e:  # datasets raises it (OfflineModeIsEnabled) for uncached Hub data
            raise UserError(
                f"lm-eval task {name!r} needs data that is not in the Hugging Face cache ({_one_line(e)}); "
                "sheared runs lm-eval offline: fill the cache beforehand, or define a local task in include_path"
            ) from None
        except FileNotFoundError as e:
            raise UserError(
                f"the data of lm-eval task {name!r} was not found: {_one_line(e)} "
                "(relative data_files resolve against the current directory)"
            ) from None
        group = loaded["groups"].get(name)
        built.extend([group] if group is not None else loaded["tasks"].values())
    return built


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _summarize(
    raw: dict,
    names: list[str],
    model_path: Path,
    include: str | None,
    num_fewshot: int | None,
    limit: int | float | None,
    batch_size: int,
    device: str,
    dtype: str,
    seed: int,
) -> dict:
    """The JSON-able part of lm-eval's results that `run_lm_eval` returns."""
    import torch
    import transformers

    return {
        "tasks": {task: _metrics(values) for task, values in raw["results"].items()},
        "n_samples": {
            task: {"original": int(n["original"]), "effective": int(n["effective"])}
            for task, n in raw.get("n-samples", {}).items()
        },
        "config": {
            "model_dir": str(model_path),
            "tasks": names,
            "include_path": include,
            "num_fewshot": num_fewshot,
            "num_fewshot_per_task": {task: int(n) for task, n in raw.get("n-shot", {}).items()},
            "limit": limit,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "seed": seed,
            "model_num_parameters": int(raw.get("config", {}).get("model_num_parameters", -1)),
        },
        "versions": {
            "tasks": {task: _json_scalar(v) for task, v in raw.get("versions", {}).items()},
            "lm_eval": str(raw.get("lm_eval_version", "")),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def _metrics(values: dict) -> dict[str, float]:
    """`metric,filter` -> float; drops lm-eval's other entries (name, alias, sample_len) and "N/A"."""
    metrics = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, (str, bool)) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics[key] = number
    return metrics


def _json_scalar(value: Any) -> str | int | float | None:
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)
