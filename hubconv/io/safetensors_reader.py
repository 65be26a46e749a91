"""Lazy safetensors reader, validating headers as the `safetensors` library does.

The header is parsed here (8-byte length + JSON) instead of through `safetensors.safe_open`
because we need each tensor's absolute byte range (for `copy_file_range`) and bfloat16 as raw
bits without torch; `safe_open(framework="numpy")` cannot hand out bfloat16. The checks are the
library's own (`Metadata::validate` and `read_metadata` in safetensors' `tensor.rs`): header at
most 100 MB of UTF-8 JSON object; `__metadata__` a str -> str map; each tensor a known dtype, a
shape of non-negative ints and `data_offsets` [begin, end] with end - begin = numel * itemsize;
sorted by offset, the tensors tile the data region [0, file size - 8 - header length] exactly (no
gap, no overlap, nothing out of bounds). Duplicate JSON keys, which the library keeps silently
(last one wins), are refused.

A folder is read through its `model.safetensors.index.json` when it has one (the files its
`weight_map` names, confined to the folder, each tensor in the file the index says), else as all
its `*.safetensors` files.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from hubconv.dtypes import BY_NAME, DType
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.paths import confined
from hubconv.io.tensor import Segment, numel

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsTensor:
    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], path: str, offset: int, pool: FilePool):
        self.name, self.dtype, self.shape, self._path, self._offset, self._pool = name, dtype, shape, path, offset, pool

    def segments(self) -> list[Segment] | None:
        return [Segment(self._path, self._offset, numel(self.shape) * self.dtype.itemsize)]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        row = numel(self.shape[1:]) * self.dtype.itemsize
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype.np)
        return self._pool.pread_into(self._path, self._offset + start * row, out)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def load_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Strict UTF-8 JSON object with no duplicate keys at any depth, or a CheckpointError naming `what`."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{what}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: must be a JSON object, not {type(obj).__name__}")
    return obj


def _are_counts(values: list[Any]) -> bool:
    """All non-negative ints (JSON gives exact ints; `type(...) is int` also rules out bools)."""
    return all(type(v) is int and v >= 0 for v in values)


def _entry(path: str, name: str, spec: object) -> tuple[DType, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {problem}")

    if type(spec) is not dict:
        raise bad(f"header entry must be an object, not {spec!r}")
    dtype_name, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    dtype = BY_NAME.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise bad(f"unsupported dtype {dtype_name!r}")
    if type(shape) is not list or not _are_counts(shape):
        raise bad(f"shape must be a list of non-negative integers, not {shape!r}")
    if not (type(offsets) is list and len(offsets) == 2 and _are_counts(offsets)):
        raise bad(f"data_offsets must be two non-negative integers, not {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    dims = tuple(shape)
    if end - begin != numel(dims) * dtype.itemsize:
        raise bad(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype_name} {shape} "
            f"needs {numel(dims) * dtype.itemsize}"
        )
    return dtype, dims, begin, end


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file, validated like the safetensors library does."""
    header, start = _read_raw_header(path)
    _validate(path, header, os.path.getsize(path) - start)
    return header, start


def _read_raw_header(path: str) -> tuple[dict[str, Any], int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES} limit")
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors header (must start with '{{')")
    return load_json_object(raw, f"{path}: safetensors header"), 8 + n


def _validate(path: str, header: dict[str, Any], data_bytes: int) -> dict[str, tuple[DType, tuple[int, ...], int]]:
    """{name: (dtype, shape, begin)} once every entry is well-formed and the entries tile the data region."""
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = {name: _entry(path, name, spec) for name, spec in header.items() if name != "__metadata__"}
    cursor, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != cursor:
            if begin < cursor:
                problem = f"overlap tensor {previous!r}, which ends at {cursor}"
            else:
                problem = f"leave a gap after {cursor}" + (f" (end of tensor {previous!r})" if previous else "")
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {problem}")
        cursor, previous = end, name
    if cursor != data_bytes:
        last = f"tensor {previous!r}: data ends at {cursor}" if previous else f"no tensor data, {cursor}"
        raise CheckpointError(
            f"{path}: {last}, but the data region is {data_bytes} bytes "
            f"({'truncated' if cursor > data_bytes else 'trailing bytes'})"
        )
    return {name: (dtype, shape, begin) for name, (dtype, shape, begin, _) in entries.items()}


def _read_index(folder: str) -> dict[str, list[str]]:
    """{file (confined real path): [tensor names]} from the folder's index `weight_map`."""
    index_path = os.path.join(folder, INDEX_NAME)
    real_index = confined(folder, INDEX_NAME, f"{index_path}: file")
    try:
        with open(real_index, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{index_path}: larger than {MAX_HEADER_BYTES} bytes")
    weight_map = load_json_object(raw, index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: weight_map must be a non-empty object of tensor name -> file")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise CheckpointError(f"{index_path}: tensor {name!r}: {file!r} is not a .safetensors file name")
        real = confined(folder, file, f"{index_path}: tensor {name!r}: file {file!r}")
        files.setdefault(real, []).append(name)
    return files


def _check_index_agrees(file: str, listed: set[str], present: set[str]) -> None:
    """Every tensor the index maps to `file` is in it, and it holds no other."""
    if stray := sorted(present - listed):
        raise CheckpointError(f"{file}: tensor {stray[0]!r} is in the file but {INDEX_NAME} does not map it here")
    if absent := sorted(listed - present):
        raise CheckpointError(f"{file}: tensor {absent[0]!r} is missing, but {INDEX_NAME} maps it to this file")


def _folder_files(folder: str) -> list[str]:
    """The folder's `*.safetensors` files (confined real paths), sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return [confined(folder, n, f"{os.path.join(folder, n)}: file") for n in names]


def open_safetensors(path: str) -> Checkpoint:
    indexed: dict[str, list[str]] | None = None
    if not os.path.isdir(path):
        files = [path]
    elif os.path.exists(os.path.join(path, INDEX_NAME)):
        indexed = _read_index(path)
        files = list(indexed)
    else:
        files = _folder_files(path)
    pool = FilePool()
    tensors: dict[str, SafetensorsTensor] = {}
    values: dict[str, object] = {}
    for file in files:
        if not os.path.isfile(file):
            named = f" (named in {os.path.join(path, INDEX_NAME)})" if indexed is not None else ""
            raise CheckpointError(f"{file}: missing or not a file{named}")
        header, start = _read_raw_header(file)
        entries = _validate(file, header, os.path.getsize(file) - start)
        values[f"{os.path.basename(file)}:__metadata__"] = header.get("__metadata__")
        if indexed is not None:
            _check_index_agrees(file, set(indexed[file]), set(entries))
        for name, (dtype, shape, begin) in entries.items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one file")
            tensors[name] = SafetensorsTensor(name, dtype, shape, file, start + begin, pool)
    return Checkpoint(path=path, format="safetensors", tensors=dict(tensors), values=values, closers=[pool.close])
