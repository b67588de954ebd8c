"""Reading experts from disk: safetensors models tensor by tensor, and PEFT LoRA adapters.

Headers are parsed and checked up front so a missing shard, a corrupt file or a pickle
checkpoint is reported before any output is written.
"""

from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from langmerge.errors import InputError

_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmerge-read")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * _numel(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt safetensors file {path}: {e}") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    data_start = 8 + n
    out = {}
    for name, meta in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"corrupt safetensors file {path}: bad entry for {name!r}") from None
        nbytes = dtype.itemsize * _numel(shape)
        if end > data_size or end - start != nbytes:
            raise InputError(
                f"corrupt or truncated safetensors file {path}: tensor {name!r} needs bytes "
                f"{start}–{end} of {data_size}; re-download or re-save this shard"
            )
        out[name] = TensorInfo(path, dtype, shape, data_start + start)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _refuse_pickle(path: Path, files: list[Path], allow_pickle: bool) -> None:
    if not allow_pickle:
        names = ", ".join(f.name for f in files[:3])
        raise InputError(
            f"{path} holds pickle checkpoints ({names}); loading pickle can run arbitrary code. "
            "Convert them to safetensors, or pass --allow-pickle if you trust their source."
        )


class ModelFiles:
    """The weights of one model directory, read one tensor at a time."""

    def __init__(self, path: Path, *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or self.path.name
        if not self.path.is_dir():
            raise InputError(f"model directory {self.path} does not exist")
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, Tensor] | None = None
        self._fds: dict[Path, int] = {}
        self._pending: dict[str, Future[Tensor]] = {}
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("*.safetensors"))
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise InputError(f"corrupt index {index}: {e}") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise InputError(f"shard {f.name} listed in {index} is missing")
        if files:
            for f in files:
                infos = read_header(f)
                self.tensors.update(sorted(infos.items(), key=lambda kv: kv[1].offset))
            try:  # opened here, before any background read can race to open them
                self._fds = {f: os.open(f, os.O_RDONLY) for f in files}
            except OSError as e:
                raise InputError(f"cannot read {e.filename}: {e.strerror}") from None
            return
        pickles = sorted(self.path.glob("pytorch_model*.bin"))
        if not pickles:
            raise InputError(f"no weights in {self.path}: expected *.safetensors files")
        _refuse_pickle(self.path, pickles, allow_pickle)
        self._pickled = {}
        for p in pickles:
            try:
                self._pickled.update(torch.load(p, map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises several kinds for unreadable pickles
                raise InputError(f"cannot load {p} as plain tensors: {e}") from None
        for name, t in self._pickled.items():
            self.tensors[name] = TensorInfo(p, t.dtype, tuple(t.shape), 0)

    def read(self, name: str) -> Tensor:
        """One tensor, read into fresh memory the caller owns and may modify.

        Plain positional reads, not a memory map: mapped pages of every input would stay
        resident (and count as the process's memory) until the file is closed.
        """
        pending = self._pending.pop(name, None)
        return pending.result() if pending is not None else self._read(name)

    def prefetch(self, name: str) -> None:
        """Start reading `name` in the background; the next `read(name)` returns it."""
        if self._pickled is None and name not in self._pending:
            self._pending[name] = _READER.submit(self._read, name)

    def _read(self, name: str) -> Tensor:
        if self._pickled is not None:
            return self._pickled[name].clone()
        info = self.tensors[name]
        fd = self._fds[info.file]
        out = torch.empty(info.shape, dtype=info.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if info.nbytes else b""
        got = 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if not n:
                raise InputError(f"{info.file} ended while reading {name}: truncated file")
            got += n
        return out

    def close(self) -> None:
        for pending in self._pending.values():
            if not pending.cancel():
                pending.exception()  # a read in progress: wait for it before closing its file
        self._pending.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_finite(t: Tensor, name: str, owner: str) -> None:
    """Raise if `t` holds NaN or Inf. A sum is finite for finite inputs (unless it overflows,
    which the exact check below then clears), so it is the fast path."""
    if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"tensor {name} of {owner} has {bad} NaN/Inf values; fix that model")


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapters.

LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.weight)?$"
)


@dataclass
class LoraModule:
    """One adapted module: ΔW = scaling · B @ A, already transposed into the weight's layout."""

    B: Tensor
    A: Tensor
    scaling: float
    layout: str = "linear"  # "embedding" / "fan_in_fan_out": stored as (BA)ᵀ by PEFT

    def peft_factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) oriented as PEFT stores them (its weighting puts a negative sign on this A)."""
        return (self.B, self.A) if self.layout == "linear" else (self.A.T, self.B.T)


@dataclass
class Adapter:
    path: Path
    label: str
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # keyed by base weight name
    saved: dict[str, Tensor] = field(default_factory=dict)  # modules_to_save, by base tensor name


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def _for_module(module: str, config: dict, pattern_key: str, key: str):
    """A per-module setting as PEFT resolves it: the first matching pattern, else the default."""
    for pattern, value in (config.get(pattern_key) or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return config.get(key)


def _check_config(config: object, where: Path) -> dict:
    """The fields of adapter_config.json that the merge reads, each of the type PEFT gives it."""

    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def rank(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not isinstance(config, dict):
        raise InputError(f"{where} must hold a JSON object (PEFT's LoraConfig)")
    if "lora_alpha" not in config:
        raise InputError(f"{where} has no lora_alpha: is it a PEFT LoRA config?")
    rules = [
        ("lora_alpha", number, "a number, e.g. 16"),
        ("r", lambda v: v is None or rank(v), "a whole number ≥ 1, e.g. 8"),
        ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
        ("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false"),
        ("use_dora", lambda v: isinstance(v, bool), "true or false"),
        ("alpha_pattern", lambda v: isinstance(v, dict) and all(map(number, v.values())),
         "a mapping of module patterns to numbers"),
        ("rank_pattern", lambda v: isinstance(v, dict) and all(map(rank, v.values())),
         "a mapping of module patterns to whole numbers"),
    ]  # fmt: skip
    for key, ok, what in rules:
        if key in config and config[key] is not None and not ok(config[key]):
            raise InputError(f"{where}: {key} must be {what}, not {json.dumps(config[key])}")
    return config


def load_adapter(path: Path, *, allow_pickle: bool = False, label: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory into per-module factors and modules_to_save tensors."""
    path = Path(path)
    label = label or path.name
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise InputError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = _check_config(json.loads(cfg_path.read_text()), cfg_path)
    except ValueError as e:
        raise InputError(f"corrupt {cfg_path}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path}: only LoRA adapters can be merged, not {config['peft_type']}")
    if config.get("use_dora"):
        raise InputError(
            f"{path}: DoRA adapters are not supported (their magnitude vector "
            "does not merge as a weight delta)"
        )
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        read_header(weights)
        try:
            state = load_file(str(weights))
        except Exception as e:
            raise InputError(f"corrupt safetensors file {weights}: {e}") from None
    else:
        pickles = sorted(p for p in path.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise InputError(f"no adapter weights in {path}: expected adapter_model.safetensors")
        _refuse_pickle(path, pickles, allow_pickle)
        try:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot load {pickles[0]} as plain tensors: {e}") from None

    adapter = Adapter(path, label, config)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        check_finite(tensor, key, f"adapter {label}")
        key = key.removeprefix("base_model.model.")
        if match := LORA_KEY.match(key):
            factors.setdefault(match["module"], {})[match["kind"]] = tensor
        elif ".base_layer." in key:
            continue  # PEFT also saves the untouched base embedding next to an embedding LoRA
        elif "lora_" in key:
            raise InputError(f"{path}: unsupported LoRA tensor {key} (LoRA biases, DoRA, …)")
        else:
            adapter.saved[key] = tensor
    use_rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in factors.items():
        if "lora_A" in parts and "lora_B" in parts:
            b, a = parts["lora_B"].float(), parts["lora_A"].float()
            layout = "fan_in_fan_out" if fan_in_fan_out else "linear"
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            b, a = parts["lora_embedding_B"].float(), parts["lora_embedding_A"].float()
            layout = "embedding"
        else:
            raise InputError(f"{path}: module {module} has an incomplete LoRA pair")
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise InputError(
                f"{path}: module {module} is not a linear LoRA (conv layers are not supported)"
            )
        r = a.shape[0]
        stated = _for_module(module, config, "rank_pattern", "r")
        if stated is not None and stated != r:
            raise InputError(
                f"{cfg_path} gives {module} rank {stated}, but its tensors have rank {r} "
                "(PEFT would not load it): correct r (or rank_pattern) in the config"
            )
        alpha = float(_for_module(module, config, "alpha_pattern", "lora_alpha"))
        scaling = alpha / (r**0.5) if use_rslora else alpha / r
        if layout != "linear":  # PEFT's ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ
            b, a = a.T.contiguous(), b.T.contiguous()
        adapter.modules[f"{module}.weight"] = LoraModule(b, a, scaling, layout)
    if not adapter.modules and not adapter.saved:
        raise InputError(f"{path}: the adapter holds no LoRA tensors")
    return adapter


# ---------------------------------------------------------------------------------------------
# Input statistics of an expert (written by langmerge.train.statistics.collect).

STATISTICS_META = "statistics.json"


class Statistics:
    """The Gram matrices of one expert, read one module at a time."""

    def __init__(self, path: Path, label: str = ""):
        self.path = Path(path)
        self.label = label or self.path.parent.name
        meta = self.path / STATISTICS_META
        if not meta.is_file():
            raise InputError(
                f"no statistics in {self.path} (expected {STATISTICS_META}): collect them first "
                "(`langmerge merge` of a recipe does so for its experts)"
            )
        try:
            info = json.loads(meta.read_text())
            self.rows: dict[str, int] = info["rows"]
            self.aliases: dict[str, str] = info["aliases"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"corrupt {meta}: {e}; delete {self.path} to collect again") from None
        self.files = ModelFiles(self.path, label=f"statistics of {self.label}")

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.rows

    def gram(self, name: str) -> Tensor:
        """Gᵢ = XᵢᵀXᵢ (float32) of the module whose weight is `name`."""
        key = self.aliases.get(name, name)
        return self.files.read(key).float().mul_(self.rows[key])

    def close(self) -> None:
        self.files.close()
