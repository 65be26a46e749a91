"""Lazy reader for torch.distributed.checkpoint (DCP) folders, without importing torch.

Layout (torch's FileSystemWriter): `.metadata` is a pickle of `Metadata`, whose
`state_dict_metadata` gives each entry's dtype, global size and chunks, and whose `storage_data`
maps each chunk to `(relative_path, offset, length)` in a `.distcp` file. Each tensor chunk is a
small uncompressed `torch.save` zip (or raw bytes with the safetensors serialization format).
We locate the raw storage bytes of every chunk inside its zip, so tensors can be copied with
`copy_file_range` or read in row blocks: memory never holds more than one block.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from hubconv.dtypes import DType, from_torch_name
from hubconv.errors import CheckpointError, HubconvError
from hubconv.io import safe_pickle
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.tensor import Segment, numel

_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: str  # absolute .distcp path
    item_offset: int
    item_length: int


class _Window(io.RawIOBase):
    """A read-only, seekable view of `length` bytes at `offset` of a file (for zipfile)."""

    def __init__(self, pool: FilePool, path: str, offset: int, length: int):
        self.pool, self.path, self.base, self.length, self.pos = pool, path, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.pool.fd(self.path), n, self.base + self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class DcpTensor:
    """One tensor of a DCP checkpoint, possibly split into chunks across `.distcp` files."""

    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], chunks: list[_Chunk], pool: FilePool):
        self.name, self.dtype, self.shape, self._chunks, self._pool = name, dtype, shape, chunks, pool

    def _locate(self, c: _Chunk) -> int:
        """Absolute file offset of the chunk's row-major raw bytes; validates the record."""
        where = f"{os.path.basename(c.path)} (tensor {self.name!r}, offset {c.item_offset})"
        want = numel(c.sizes) * self.dtype.itemsize
        head = self._pool.pread(c.path, c.item_offset, min(4, c.item_length))
        if head != _ZIP_MAGIC:
            if c.item_length != want:  # safetensors serialization: raw bytes
                raise CheckpointError(f"{where}: unrecognised tensor record ({c.item_length} bytes, expected {want})")
            return c.item_offset
        try:
            zf = zipfile.ZipFile(_Window(self._pool, c.path, c.item_offset, c.item_length))
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{where}: corrupt tensor record ({e})") from None
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{where}: tensor record has no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        try:
            rebuilt = safe_pickle.loads(zf.read(pkl), where)
        except Exception as e:
            raise CheckpointError(f"{where}: cannot read tensor record ({e})") from None
        if not isinstance(rebuilt, safe_pickle.RebuiltTensor):
            raise CheckpointError(f"{where}: record does not hold a plain tensor")
        _, storage_dtype, key, _location, storage_numel = rebuilt.storage
        if storage_dtype != self.dtype.torch_name:
            raise CheckpointError(f"{where}: stored as {storage_dtype}, metadata says {self.dtype}")
        if rebuilt.size != c.sizes:
            raise CheckpointError(f"{where}: stored shape {rebuilt.size}, metadata says {c.sizes}")
        if rebuilt.stride != _contiguous_strides(c.sizes) and numel(c.sizes) > 1:
            raise CheckpointError(f"{where}: tensor is not stored contiguously (stride {rebuilt.stride})")
        info = zf.getinfo(f"{prefix}data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{where}: compressed tensor data is not supported")
        if (
            info.file_size != storage_numel * self.dtype.itemsize
            or rebuilt.storage_offset + numel(c.sizes) > storage_numel
        ):
            raise CheckpointError(f"{where}: storage size does not match the tensor")
        local = self._pool.pread(c.path, c.item_offset + info.header_offset, 30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len + rebuilt.storage_offset * self.dtype.itemsize
        if start + want > c.item_length:
            raise CheckpointError(f"{where}: tensor data runs past the end of its record")
        return c.item_offset + start

    @cached_property
    def _starts(self) -> list[int]:
        return [self._locate(c) for c in self._chunks]

    def _row_split(self) -> bool:
        """True when chunks are whole-row slabs (FSDP Shard(0) or a single chunk)."""
        return all(c.sizes[1:] == self.shape[1:] for c in self._chunks)

    def segments(self) -> list[Segment] | None:
        if not self._row_split():
            return None
        row = numel(self.shape[1:]) * self.dtype.itemsize
        return [
            Segment(c.path, start, c.sizes[0] * row if self.shape else self.dtype.itemsize)
            for c, start in zip(self._chunks, self._starts, strict=True)
        ]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        if not self.shape:
            out = np.empty((1,), dtype=self.dtype.np)
            return self._pool.pread_into(self._chunks[0].path, self._starts[0], out)
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype.np)
        for c, base in zip(self._chunks, self._starts, strict=True):
            lo, hi = max(start, c.offsets[0]), min(stop, c.offsets[0] + c.sizes[0])
            if lo >= hi:
                continue
            crow = numel(c.sizes[1:]) * self.dtype.itemsize
            if c.sizes[1:] == self.shape[1:]:  # whole rows: read straight into place
                self._pool.pread_into(c.path, base + (lo - c.offsets[0]) * crow, out[lo - start : hi - start])
                continue
            block = np.empty((hi - lo, *c.sizes[1:]), dtype=self.dtype.np)
            self._pool.pread_into(c.path, base + (lo - c.offsets[0]) * crow, block)
            inner = (slice(o, o + s) for o, s in zip(c.offsets[1:], c.sizes[1:], strict=True))
            index = (slice(lo - start, hi - start), *inner)
            out[index] = block
        return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _state(obj: Any) -> dict[str, Any]:
    return obj.__dict__


def _dtype_of(props: Any) -> str:
    d = _state(props)
    if "dtype" in d:
        return str(d["dtype"])
    return str(d["state"][0])  # TensorProperties.__getstate__ -> (dtype, layout, requires_grad, ...)


def open_dcp(path: str) -> Checkpoint:
    """Read `.metadata` (allow-listed unpickling) and index every tensor chunk."""
    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path}: missing; a DCP checkpoint folder needs its .metadata file")
    with open(meta_path, "rb") as f:
        raw = f.read()
    try:
        md = safe_pickle.loads(raw, meta_path)
        sd_meta: dict[str, Any] = _state(md)["state_dict_metadata"]
        storage: dict[Any, Any] = _state(md)["storage_data"]
    except Exception as e:
        raise CheckpointError(f"{meta_path}: corrupt or unsupported DCP metadata ({e})") from None
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: corrupt DCP metadata")

    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for index, info in storage.items():
        where[(index.fqn, tuple(getattr(index, "offset", None) or ()))] = _state(info)

    pool = FilePool()
    sizes: dict[str, int] = {}
    tensors: dict[str, DcpTensor] = {}
    entries: list[str] = []
    try:
        for fqn, item in sd_meta.items():
            if not isinstance(item, safe_pickle.TensorStorageMetadata):
                entries.append(fqn)
                continue
            st = _state(item)
            try:
                dtype = from_torch_name(_dtype_of(st["properties"]))
            except HubconvError as e:
                raise CheckpointError(f"{meta_path}: tensor {fqn!r}: {e}") from None
            shape = tuple(st["size"])
            chunks = []
            for ch in st["chunks"]:
                c = _state(ch)
                offsets, csizes = tuple(c["offsets"]), tuple(c["sizes"])
                info = where.get((fqn, offsets))
                if info is None:
                    raise CheckpointError(f"{meta_path}: tensor {fqn!r} chunk at {offsets} has no storage entry")
                if info.get("transform_descriptors"):
                    raise CheckpointError(
                        f"{meta_path}: tensor {fqn!r} uses storage transforms {info['transform_descriptors']} "
                        "(compressed DCP), which hubconv does not read"
                    )
                file = os.path.join(path, info["relative_path"])
                if file not in sizes:
                    if not os.path.isfile(file):
                        raise CheckpointError(f"{file}: missing (listed in {meta_path} for tensor {fqn!r})")
                    sizes[file] = os.path.getsize(file)
                if info["offset"] + info["length"] > sizes[file]:
                    raise CheckpointError(
                        f"{file}: truncated: tensor {fqn!r} needs bytes up to {info['offset'] + info['length']}, "
                        f"file has {sizes[file]}"
                    )
                chunks.append(_Chunk(offsets, csizes, file, info["offset"], info["length"]))
            chunks.sort(key=lambda c: c.offsets)
            if sum(numel(c.sizes) for c in chunks) != numel(shape):
                raise CheckpointError(f"{meta_path}: chunks of tensor {fqn!r} do not cover its shape {shape}")
            tensors[fqn] = DcpTensor(fqn, dtype, shape, chunks, pool)
    except BaseException:
        pool.close()
        raise
    return Checkpoint(path=path, format="dcp", tensors=dict(tensors), entries=entries, closers=[pool.close])
