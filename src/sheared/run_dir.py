"""The run directory: the one place that knows its files and what they mean.

A run of `sheared prune` or `sheared train` writes (docs/formats.md has the details):

    RUN_DIR/
      config.yaml           the resolved config (written once, when the run starts; never rewritten)
      config.resume-N.yaml  the resolved config of the N-th resumed attempt
      metrics.jsonl         one JSON object per step (keys below)
      metrics.damaged.jsonl lines of metrics.jsonl that were not records, set aside by `--resume`
      tensorboard/          the same scalars for TensorBoard (when installed)
      checkpoints/step_N/   resumable checkpoints: trainer_state.json, manifest.json and the
                            torch.distributed.checkpoint shards (`sheared.train.checkpoint` writes them)
      masks/masks.pt        pruning runs, at the end: exact-target binary masks, log_alpha, shapes
      masks/masks.json      ... and a readable summary of the kept structures
      scores.pt             one-shot scores of every structure (one-shot runs and scored l0 inits)
      target_search.json    budget targets: the ranked candidates and the chosen shape
      final_state.json      one-shot runs: domains, weights, reference losses, tokens (no checkpoint)
                            continued pretraining ended early by a deadline: its last step
      report/               `sheared report` output

A run moved aside by `--restart` keeps these files in `RUN.replaced-N/` beside it.

What a folder means is answered here too: `RunDir.kind()` (a learned pruning run, a one-shot one,
a continued-pretraining one, or no run), `RunDir.finished()`, `RunDir.newest_checkpoint()`, and
the readers of its config, metrics, final masks and final state.

Every other room (the loop, export, report, demo, study) asks this module for names and meanings
and never spells a file name of a run directory itself. It sits on the ground floor: it imports
nothing of the model, the pruning, the data or the trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sheared.config import read_yaml
from sheared.errors import UserError
from sheared.files import atomic_write, atomic_write_json

CONFIG_FILE = "config.yaml"
RESUME_CONFIG = "config.resume-{}.yaml"  # the resolved config of each resumed attempt
METRICS_FILE = "metrics.jsonl"
METRICS_DAMAGED = "metrics.damaged.jsonl"  # damaged lines of metrics.jsonl, set aside by `--resume`
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
MASKS_DIR = "masks"
MASKS_FILE = "masks.pt"
MASKS_SUMMARY = "masks.json"
SCORES_FILE = "scores.pt"
TARGET_SEARCH_FILE = "target_search.json"  # budget targets: the ranked candidates and the chosen shape
# One-shot runs have no checkpoint: what export and continued pretraining need from the run
# (domains, weights, reference losses, tokens) is kept here instead.
FINAL_STATE_FILE = "final_state.json"
REPORT_DIR = "report"
REPLACED_DIR = "{}.replaced-{}"  # RUN.replaced-N: the files of a run moved aside by `--restart`
# Written by `sheared export` next to a model: the run's domain weights and reference losses, so
# that continued pretraining of that model starts from them.
RUN_STATE_FILE = "sheared_run_state.json"

# Inside a checkpoint folder `checkpoints/step_000100/` (the rest: torch.distributed.checkpoint's
# `*.distcp` and `.metadata`).
STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"  # step, tokens, sampler state, DBL history, reference losses
MANIFEST = "manifest.json"  # every other file's size and CRC-32, written last
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed its manifest, set aside by `--resume`
HASH_BLOCK_BYTES = 1 << 24

# Metric keys of metrics.jsonl. Scalars: step, tokens, loss (LM + Lagrangian), lm_loss (the data
# loss: CE, or (1 - α)·CE + α·τ²·KD when distilling), ce_loss and kd_loss (distilling), lag_loss, lr,
# grad_norm, tokens_per_s, expected_params. Per domain or per mask type, `PREFIX + name`:
EVAL_LOSS = "eval_loss/"  # the held-out split: what results report
VAL_LOSS = "val_loss/"  # the validation split dynamic batch loading reweights on (when prepared)
REFERENCE_LOSS = "reference_loss/"
EVAL_KL = "eval_kl/"  # KL(teacher ‖ model) per domain, at temperature 1, when distilling
DOMAIN_WEIGHT = "domain_weight/"
EXPECTED_SPARSITY = "expected_sparsity/"
TARGET_SPARSITY = "target_sparsity/"
LAMBDA1 = "lambda1/"
LAMBDA2 = "lambda2/"
LAG_LOSS = "lag_loss/"
TIMING_KEYS = ("tokens_per_s",)  # the only keys that differ between two runs of the same config

RunKind = Literal["prune", "oneshot", "train"]
LEARNED_METHOD = "l0"  # `pruning.method` of learned-mask runs; every other method is one-shot
# Keys of the resolved config a resumed attempt may not change: they make another run (the checkpoint
# would not fit it, or would continue another stream). `source` and `model` are paths.
RESUME_FIXED = (
    "source",
    "model",
    "pruning.method",
    "pruning.controller",
    "pruning.target",
    "data.path",
    "train.seed",
)
PATH_KEYS = ("source", "model", "data.path")


@dataclass(frozen=True)
class RunDir:
    """One run directory: the paths inside it (properties) and what they mean (methods)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def metrics_damaged(self) -> Path:
        return self.path / METRICS_DAMAGED

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def masks(self) -> Path:
        return self.path / MASKS_DIR / MASKS_FILE

    @property
    def masks_summary(self) -> Path:
        return self.path / MASKS_DIR / MASKS_SUMMARY

    @property
    def scores(self) -> Path:
        return self.path / SCORES_FILE

    @property
    def target_search(self) -> Path:
        return self.path / TARGET_SEARCH_FILE

    @property
    def final_state(self) -> Path:
        return self.path / FINAL_STATE_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR

    def is_run(self) -> bool:
        """Whether this folder was written by `sheared prune` or `sheared train` (has its config)."""
        return self.config.is_file()

    def holds_run(self) -> bool:
        """Whether a run already started here (a checkpoint, masks or a metrics line exists)."""
        has_checkpoint = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        return self.metrics.exists() or has_checkpoint or self.masks.exists()

    def check_fresh(self, resume: bool) -> None:
        """Refuse to start a new run over an existing one (unless resuming it)."""
        if resume or not self.holds_run():
            return
        has_checkpoint = self.checkpoints.is_dir() and any(
            p.is_dir() and not p.name.endswith(".tmp") for p in self.checkpoints.iterdir()
        )
        aside = self.replaced_dir().name
        if has_checkpoint or self.masks.exists():
            raise UserError(
                f"run directory {self.path} already holds a run; pass --resume to continue it, --restart to "
                f"move its files to {aside} and start again, or choose another --run-dir"
            )
        raise UserError(
            f"run directory {self.path} holds a run that stopped before its first checkpoint; pass --restart "
            f"to move its files to {aside} and start it again from step 0, or choose another --run-dir"
        )

    def check_resume(self, new: dict[str, Any]) -> None:
        """Refuse a resumed attempt that would be another run: `new` (the resolved config as config.yaml
        holds it) changes a key of `RESUME_FIXED`, or is of the other command. One line naming the key,
        the run's value and the new one. Keys an older config.yaml lacks are not compared.

        A budget target is compared with the budget `target_search.json` recorded (a run given an
        exact shape has none: a budget is then another target).
        """
        saved = self.latest_config()
        if saved is None:
            return
        old_kind, new_kind = ("train" if "pruning" not in c else "prune" for c in (saved, new))
        if old_kind != new_kind:
            raise UserError(
                f"{self.path} holds a run of `sheared {old_kind}`; resume it with `sheared {old_kind} --resume`, "
                "or choose another --run-dir"
            )
        for key in RESUME_FIXED:
            old_value, new_value = _lookup(saved, key), _lookup(new, key)
            if old_value is _MISSING or new_value is _MISSING:
                continue
            if key == "pruning.target" and isinstance(old_value, dict) and isinstance(new_value, dict):
                if old_value.keys() == new_value.keys():  # two exact shapes: name the number that differs
                    for name in old_value:
                        self._refuse_change(f"{key}.{name}", old_value[name], new_value[name])
                    continue
                if self.target_search.is_file():  # a budget: the one its search recorded
                    old_value = json.loads(self.target_search.read_text())["budget"]
                    old_value, new_value = (
                        {k: v for k, v in b.items() if v is not None} for b in (old_value, new_value)
                    )
                    if old_value != new_value:
                        raise UserError(
                            f"--resume cannot change pruning.target: {self.target_search} was searched for another "
                            f"budget ({old_value}), this config {new_value}; resume with the same pruning.target, "
                            "or start the new run in another --run-dir (or with --restart)"
                        )
                    continue
            self._refuse_change(key, old_value, new_value)

    def _refuse_change(self, key: str, old: Any, new: Any) -> None:
        same = old == new or (
            key in PATH_KEYS
            and isinstance(old, str)
            and isinstance(new, str)
            and Path(old).resolve() == Path(new).resolve()
        )
        if not same:
            raise UserError(
                f"--resume cannot change {key}: the run in {self.path} has {old}, this config {new}; resume "
                f"with {old}, or start the new run in another --run-dir (or with --restart)"
            )

    def run_files(self) -> list[Path]:
        """The files and folders of the run in this folder (those this module names) that exist."""
        names = (CONFIG_FILE, METRICS_FILE, METRICS_DAMAGED, TENSORBOARD_DIR, CHECKPOINT_DIR, MASKS_DIR)
        names += (SCORES_FILE, TARGET_SEARCH_FILE, FINAL_STATE_FILE, REPORT_DIR)
        found = [self.path / name for name in names]
        found += sorted(self.path.glob(RESUME_CONFIG.format("*")))
        return [p for p in found if p.exists()]

    def replaced_dir(self) -> Path:
        """Where `move_aside` would put this run's files: the first free `RUN.replaced-N` beside it."""
        path, n = self.path.resolve(), 1
        while path.with_name(REPLACED_DIR.format(path.name, n)).exists():
            n += 1
        return path.with_name(REPLACED_DIR.format(path.name, n))

    def move_aside(self) -> Path | None:
        """Move the run's files (`run_files`) into a new `RUN.replaced-N/` beside the folder, each by
        one rename (nothing is copied or deleted; other files stay); None when there is no run here."""
        found = self.run_files()
        if not found:
            return None
        aside = self.replaced_dir()
        aside.mkdir()
        for path in found:
            os.replace(path, aside / path.name)
        return aside

    def _resumes(self) -> int:
        """How many resumed attempts wrote their config (config.resume-1.yaml, ...)."""
        n = 0
        while (self.path / RESUME_CONFIG.format(n + 1)).exists():
            n += 1
        return n

    def next_resume_config(self) -> Path:
        """Where the resolved config of the next resumed attempt goes (config.yaml is never rewritten)."""
        return self.path / RESUME_CONFIG.format(self._resumes() + 1)

    # --- what the folder means -------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        """The resolved config.yaml the run started with, as a dict; None when the folder has none.

        Raises:
            UserError: config.yaml is not valid YAML or holds no mapping.
        """
        return read_yaml(self.config) if self.config.is_file() else None

    def latest_config(self) -> dict[str, Any] | None:
        """The resolved config of the newest attempt (the last config.resume-N.yaml, else config.yaml)."""
        n = self._resumes()
        return read_yaml(self.path / RESUME_CONFIG.format(n)) if n else self.read_config()

    def kind(self) -> RunKind | None:
        """What ran here, from the config the run started with: `prune` (learned masks), `oneshot`
        (one-shot pruning), `train` (continued pretraining), or None (no config.yaml: not a run)."""
        config = self.read_config()
        return None if config is None else run_kind(config)

    def finished(self, steps: int | None = None) -> bool:
        """Whether the run is complete, by the rule of its kind:

        - one-shot pruning: `final_state.json` (written last) and `masks/masks.pt` exist;
        - learned pruning: its newest complete checkpoint is of the final step, and the final
          masks (written after it) exist;
        - continued pretraining: its newest complete checkpoint is of the final step (the step
          `final_state.json` names, when a deadline ended the run early).

        A checkpoint is always written after the final step (`train.save_interval` or not).

        Args:
            steps: the final step to ask about (a caller about to run a config of its own); default
                the `train.steps` of the run's newest resolved config.

        Returns:
            False for a folder that is not a run.
        """
        kind = self.kind()
        if kind is None:
            return False
        if kind == "oneshot":
            return self.final_state.is_file() and self.masks.is_file()
        if steps is None:
            steps = ((self.latest_config() or {}).get("train") or {}).get("steps")
            if steps is None:
                return False
        ended = self.read_final_state() if kind == "train" else None
        if ended is not None and "last_step" in ended:  # a deadline ended it early
            steps = ended["last_step"]
        newest = self.newest_checkpoint()
        at_end = newest is not None and newest.name == checkpoint_name(steps)
        return at_end and (kind == "train" or self.masks.is_file())

    def remove_checkpoints(self) -> int:
        """Delete every checkpoint of the run (a finished run whose model is exported); bytes freed."""
        if not self.checkpoints.is_dir():
            return 0
        freed = sum(f.stat().st_size for f in self.checkpoints.rglob("*") if f.is_file())
        shutil.rmtree(self.checkpoints)
        return freed

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (those with a manifest), oldest first; not verified."""
        return list_checkpoints(self.path)

    def intact_checkpoint(self, problems: list[tuple[Path, str]] | None = None) -> Path | None:
        """The newest checkpoint that matches its manifest (`checkpoint_problem`), or None. Every
        `step_N` folder newer than it is damaged: a finished save always leaves its manifest, so one
        without a manifest lost it. Those newer ones, with what is wrong, are appended to `problems`.
        Reads every file of the checkpoints it checks."""
        for path in reversed(checkpoint_folders(self.path)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if problems is not None:
                problems.append((path, problem))
        return None

    def newest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder (it has its manifest; not verified against it:
        `checkpoint_problem` does that), or None."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def read_metrics(self, notes: list[str] | None = None) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (`read_metrics`)."""
        return read_metrics(self.path, notes)

    def load_masks(self) -> dict[str, Any] | None:
        """masks.pt of a finished pruning run (`load_masks`), or None."""
        return load_masks(self.path)

    def read_final_state(self) -> dict[str, Any] | None:
        """final_state.json of a one-shot run (`read_final_state`), or None."""
        return read_final_state(self.path)

    def load_scores(self) -> dict[str, Any] | None:
        """scores.pt of a one-shot run or a scored l0 init (`load_run_scores`), or None."""
        return load_run_scores(self.path)


def pruning_method(config: dict[str, Any]) -> str | None:
    """`pruning.method` of a resolved prune config (`l0` when an older one lacks it); None for training."""
    if "pruning" not in config:
        return None
    return (config["pruning"] or {}).get("method", LEARNED_METHOD)


def run_kind(config: dict[str, Any]) -> RunKind:
    """What a resolved config runs: `prune` (learned masks), `oneshot` (one-shot pruning) or `train`."""
    method = pruning_method(config)
    if method is None:
        return "train"
    return "prune" if method == LEARNED_METHOD else "oneshot"


_MISSING = object()


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value of a dotted key (`pruning.target`) in a config dict, or `_MISSING`."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def metric(prefix: str, name: str) -> str:
    """The metrics.jsonl key of a per-domain or per-mask value, e.g. `eval_loss/code`."""
    return prefix + name


def read_metrics(run_dir: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order; [] when there is none yet.

    Metrics are appended and flushed per step, so only the last line can be half-written (a run
    writing while we read, or one that was killed): it is skipped, with a note. Blank lines are
    skipped.

    Args:
        run_dir: the run directory.
        notes: when given, what was skipped is appended to it (one line each).

    Raises:
        UserError: a line before the last is not a metrics record (a JSON object with `step`).
    """
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError
        except ValueError:
            if i == last:
                if notes is not None:
                    notes.append(
                        f"the last line of {METRICS_FILE} is incomplete (the run is writing it); skipped"
                    )
                continue
            raise UserError(
                f"{path} line {i + 1} is not a metrics record (a JSON object with 'step')"
            ) from None
        records.append(record)
    return records


def _record(line: bytes) -> dict[str, Any] | None:
    """A metrics record parsed from one line, or None when the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


RECORD_START = b'{"step": '  # how every line MetricsWriter writes begins


def cut_metrics(run_dir: str | Path, step: int) -> tuple[list[dict[str, Any]], str | None]:
    """Cut metrics.jsonl back to the records of steps up to `step` (a resumed run rewrites the later
    ones, which a run that stopped after its checkpoint had written), losing no damaged line.

    A line in the middle that is not a record (cut short, or overwritten) is moved to
    metrics.damaged.jsonl (appended, byte for byte); when a complete record follows the cut inside
    the same line (a line cut short without its newline), that record is kept. A half-written last
    line (no newline: the line being written when the run stopped) is of a step after `step` and is
    dropped like the other later lines.

    Returns:
        The records kept, in order, and a one-line note of the damaged lines set aside (or None).
    """
    files = RunDir(run_dir)
    if not files.metrics.is_file():
        return [], None
    data = files.metrics.read_bytes()
    lines = data.split(b"\n")
    kept: list[tuple[bytes, dict[str, Any]]] = []
    damaged: list[bytes] = []
    where: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None and number == len(lines):  # no newline after it: half-written
            continue
        if record is None:
            cut = line.rfind(RECORD_START)
            record = _record(line[cut:]) if cut > 0 else None
            damaged.append(line[:cut] if record is not None else line)
            where.append(number)
            if record is not None:
                line = line[cut:]
        if record is not None and record["step"] <= step:
            kept.append((line, record))
    if damaged:
        old = files.metrics_damaged.read_bytes() if files.metrics_damaged.is_file() else b""
        atomic_write(
            files.metrics_damaged, lambda f: f.write(old + b"".join(d + b"\n" for d in damaged)), binary=True
        )
    atomic_write(files.metrics, lambda f: f.write(b"".join(line + b"\n" for line, _ in kept)), binary=True)
    note = None
    if damaged:
        numbers = ", ".join(map(str, where))
        note = (
            f"{METRICS_FILE} line{'s' if len(where) > 1 else ''} {numbers} {'were' if len(where) > 1 else 'was'} "
            f"damaged; moved to {METRICS_DAMAGED}, the {len(kept)} intact records up to step {step} are kept"
        )
    return [r for _, r in kept], note


# --- checkpoints: names, listing, manifest -------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after `step` steps, e.g. `step_000100`."""
    return f"step_{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint folder, from its name; None for any other folder."""
    found = STEP_PATTERN.match(Path(path).name)
    return int(found.group(1)) if found else None


def checkpoint_run(path: str | Path) -> RunDir | None:
    """The run a checkpoint folder (`RUN/checkpoints/step_N`, with its trainer state) belongs to,
    or None when `path` is not a checkpoint folder."""
    p = Path(path)
    return RunDir(p.parent.parent) if (p / TRAINER_STATE).is_file() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first; not yet verified."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name) and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every `step_N` checkpoint folder of a run, with a manifest or not, oldest first (not the
    `.tmp` ones a save is writing, nor the `.damaged` ones `--resume` set aside)."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)), key=checkpoint_step
    )


def _crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            value = zlib.crc32(block, value)
    return value


def write_manifest(folder: Path) -> None:
    """`manifest.json`: the size and CRC-32 of every other file of a checkpoint folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    atomic_write_json(folder / MANIFEST, {"files": entries})


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder against its manifest, or None when it is intact.

    Intact: the manifest lists files, every file it lists has its size and CRC-32, and the folder
    holds no file it does not list (an emptied manifest vouches for nothing)."""
    try:
        entries = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(entries, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is missing or unreadable"
    if not entries:
        return f"its {MANIFEST} lists no files"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}"
        if _crc32(file) != entry["crc32"]:
            return f"{name} does not match its checksum"
    unlisted = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    unlisted = [name for name in unlisted if name not in entries]
    if unlisted:
        return f"{unlisted[0]} is not in its {MANIFEST}"
    return None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


class Trainable(nn.Module):
    """Everything the optimizer updates, under one module so checkpoints name it consistently:
    `model.*` (the decoder), `l0.log_alpha.*` and `lagrangian.lambda1/2.*` (pruning runs only).

    `l0` is a `sheared.pruning.L0Module` and `lagrangian` a `sheared.pruning.LagrangianConstraint`.
    """

    def __init__(self, model: nn.Module, l0: nn.Module | None = None, lagrangian: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.l0 = l0
        self.lagrangian = lagrangian


def load_module_weights(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load only the module part of a checkpoint (for export); returns its trainer state.

    The checkpoint is verified against its manifest first (a damaged one is a UserError). Needs
    no process group.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(
            f"checkpoint {path} is damaged or incomplete: {problem}; export an earlier checkpoint"
        )
    state = {"model": module.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    module.load_state_dict(state["model"])
    return read_trainer_state(path)


# --- final masks ---------------------------------------------------------------------------------


def save_final_masks(run_dir: str | Path, masks: dict[str, torch.Tensor], extra: dict[str, Any]) -> Path:
    """Write the final exact-target masks of a pruning run, atomically.

    Args:
        run_dir: the run directory.
        masks: mask name -> binary tensor (exact target counts).
        extra: what else `masks.pt` holds: `log_alpha` (name -> tensor), `target` and `source`
            (the shapes as dicts), and `summary` (the readable `masks.json` content).

    Returns:
        The masks folder.
    """
    files = RunDir(run_dir)
    tensors = {name: t.detach().cpu() for name, t in masks.items()}
    content = {
        "masks": tensors,
        "log_alpha": {k: v.detach().cpu() for k, v in extra.get("log_alpha", {}).items()},
        "target": extra["target"],
        "source": extra["source"],
    }
    atomic_write(files.masks, lambda f: torch.save(content, f), binary=True)
    atomic_write_json(files.masks_summary, extra["summary"], indent=1)
    return files.masks.parent


def load_masks(run_dir: str | Path) -> dict[str, Any] | None:
    """masks.pt of a finished pruning run ({"masks", "log_alpha", "target", "source"}), or None."""
    path = RunDir(run_dir).masks
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run_scores(run_dir: str | Path) -> dict[str, Any] | None:
    """scores.pt of a run ({"scores", "source", "calibration", "fingerprint"}: `sheared.train.calibration`
    writes it and checks it for reuse), or None."""
    path = RunDir(run_dir).scores
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the run state kept next to an export --------------------------------------------------------


def write_run_state(model_dir: str | Path, state: dict[str, Any]) -> Path:
    """Keep a run's final domain weights and reference losses next to the model it exported."""
    return atomic_write_json(Path(model_dir) / RUN_STATE_FILE, state)


def read_run_state(model_path: str | Path) -> dict[str, Any]:
    """The state `write_run_state` kept next to a model, or {} (any other model)."""
    path = Path(model_path) / RUN_STATE_FILE
    return json.loads(path.read_text()) if Path(model_path).is_dir() and path.is_file() else {}


def write_final_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """The end state of a run without checkpoints (one-shot pruning)."""
    return atomic_write_json(RunDir(run_dir).final_state, state)


def read_final_state(run_dir: str | Path) -> dict[str, Any] | None:
    """`write_final_state`'s content, or None."""
    path = RunDir(run_dir).final_state
    return json.loads(path.read_text()) if path.is_file() else None
