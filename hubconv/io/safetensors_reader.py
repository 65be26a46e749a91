"""Lazy safetensors reader.

The header is parsed here (8-byte length + JSON) instead of through `safetensors.safe_open`
because we need each tensor's absolute byte range (for `copy_file_range`) and bfloat16 as raw
bits without torch; `safe_open(framework="numpy")` cannot hand out bfloat16.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from hubconv.dtypes import BY_NAME, DType
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.tensor import Segment, numel


class SafetensorsTensor:
    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], path: str, offset: int, pool: FilePool):
        self.name, self.dtype, self.shape, self._path, self._offset, self._pool = name, dtype, shape, path, offset, pool

    def segments(self) -> list[Segment] | None:
        return [Segment(self._path, self._offset, numel(self.shape) * self.dtype.itemsize)]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        row = numel(self.shape[1:]) * self.dtype.itemsize
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype.np)
        return self._pool.pread_into(self._path, self._offset + start * row, out)


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file, validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def open_safetensors(path: str) -> Checkpoint:
    files = (
        sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if os.path.isdir(path)
        else [path]
    )
    pool = FilePool()
    tensors: dict[str, SafetensorsTensor] = {}
    values: dict[str, object] = {}
    for file in files:
        header, start = read_header(file)
        size = os.path.getsize(file)
        values.update({f"{os.path.basename(file)}:__metadata__": header.pop("__metadata__", None)})
        for name, spec in header.items():
            try:
                dtype = BY_NAME[spec["dtype"]]
                shape = tuple(spec["shape"])
                lo, hi = spec["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: tensor {name!r}: malformed header entry {spec!r}") from None
            if hi - lo != numel(shape) * dtype.itemsize or start + hi > size:
                raise CheckpointError(f"{file}: tensor {name!r}: data range {lo}..{hi} is inconsistent or truncated")
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one file")
            tensors[name] = SafetensorsTensor(name, dtype, shape, file, start + lo, pool)
    return Checkpoint(path=path, format="safetensors", tensors=dict(tensors), values=values, closers=[pool.close])
