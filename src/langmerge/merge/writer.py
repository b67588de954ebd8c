"""Writing merge outputs: sharded safetensors streamed tensor by tensor, and the model files
beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from langmerge.merge.io import DTYPE_CODES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md"}


class ShardedWriter:
    """Writes tensors in a fixed, planned order straight to safetensors shards.

    The plan (name, dtype, shape) fixes every shard's header before any data, so no shard is
    ever held in memory: peak memory is the tensor being written.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
    ):
        self.out_dir = Path(out_dir)
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry[1], entry[2])
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(entry)
            size += nbytes
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [e for shard in self.shards for e in shard]
        self._pos = 0
        self._shard = -1
        self._file = None
        self._left_in_shard = 0

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        self._shard += 1
        entries = self.shards[self._shard]
        header, offset = {}, 0
        for name, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = (self.out_dir / self.names[self._shard]).open("wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._left_in_shard = len(entries)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor of the plan; its name, dtype and shape must match the plan."""
        want = self._order[self._pos]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise RuntimeError(f"writer expected {want}, got {(name, tensor.dtype, tensor.shape)}")
        if self._left_in_shard == 0:
            self._open_next()
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        self._pos += 1
        self._left_in_shard -= 1

    def abort(self) -> None:
        """Close the open shard after an error (the caller removes the directory)."""
        if self._file:
            self._file.close()

    def close(self) -> None:
        """Finish the last shard and write the index of a sharded model."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if self._file:
            self._file.close()
        if len(self.names) > 1:
            total = sum(_nbytes(d, s) for _, d, s in self._order)
            weight_map = {
                n: self.names[i] for i, shard in enumerate(self.shards) for n, _, _ in shard
            }
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of a model directory."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in NOT_COPIED:
            shutil.copyfile(p, Path(dst) / p.name)  # modes from the umask
            copied.append(p.name)
    return copied
