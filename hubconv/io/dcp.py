"""Lazy reader for torch.distributed.checkpoint (DCP) folders, without importing torch.

Layout (torch's FileSystemWriter): `.metadata` is a pickle of `Metadata`, whose
`state_dict_metadata` gives each entry's dtype, global size and chunks, and whose `storage_data`
maps each chunk to `(relative_path, offset, length)` in a `.distcp` file. Each tensor chunk is a
small uncompressed `torch.save` zip (or raw bytes with the safetensors serialization format).
We locate the raw storage bytes of every chunk inside its zip, so tensors can be copied with
`copy_file_range` or read in row blocks: memory never holds more than one block.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from hubconv.dtypes import DType, from_torch_name
from hubconv.errors import CheckpointError, HubconvError
from hubconv.io import safe_pickle, torch_zip
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.paths import confined
from hubconv.io.tensor import Segment, contiguous_strides, numel
from hubconv.io.window import Window

_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: str  # absolute .distcp path
    item_offset: int
    item_length: int


class DcpTensor:
    """One tensor of a DCP checkpoint, possibly split into chunks across `.distcp` files."""

    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], chunks: list[_Chunk], pool: FilePool):
        self.name, self.dtype, self.shape, self._chunks, self._pool = name, dtype, shape, chunks, pool

    def _locate(self, c: _Chunk) -> int:
        """Absolute file offset of the chunk's row-major raw bytes; validates the record."""
        where = f"{os.path.basename(c.path)} (tensor {self.name!r}, offset {c.item_offset})"
        try:
            return self._locate_in(c, where)
        except (*torch_zip.ZIP_ERRORS, struct.error, TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: corrupt tensor record ({type(e).__name__}: {e})") from None

    def _locate_in(self, c: _Chunk, where: str) -> int:
        want = numel(c.sizes) * self.dtype.itemsize
        head = self._pool.pread(c.path, c.item_offset, min(4, c.item_length))
        if head != _ZIP_MAGIC:
            if c.item_length != want:  # safetensors serialization: raw bytes
                raise CheckpointError(f"{where}: unrecognised tensor record ({c.item_length} bytes, expected {want})")
            return c.item_offset
        zf = zipfile.ZipFile(Window(self._pool, c.path, c.item_offset, c.item_length))
        infos = torch_zip.check_members(zf, where, max_members=torch_zip.MAX_RECORD_MEMBERS)
        pkl = next((i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{where}: tensor record has no data.pkl")
        prefix = pkl.filename[: -len("data.pkl")]
        raw = torch_zip.read_member(zf, pkl, torch_zip.MAX_RECORD_PICKLE, where)
        try:
            rebuilt = safe_pickle.loads(raw, where)
        except Exception as e:
            raise CheckpointError(f"{where}: cannot read tensor record ({e})") from None
        if not isinstance(rebuilt, safe_pickle.RebuiltTensor):
            raise CheckpointError(f"{where}: record does not hold a plain tensor")
        storage = rebuilt.storage
        if not (isinstance(storage, tuple) and len(storage) == 5 and storage[0] == "storage"):
            raise CheckpointError(f"{where}: record does not hold a plain tensor storage")
        _, storage_dtype, key, _location, storage_numel = storage
        if storage_dtype != self.dtype.torch_name:
            raise CheckpointError(f"{where}: stored as {storage_dtype}, metadata says {self.dtype}")
        if rebuilt.size != c.sizes:
            raise CheckpointError(f"{where}: stored shape {rebuilt.size}, metadata says {c.sizes}")
        if rebuilt.stride != contiguous_strides(c.sizes) and numel(c.sizes) > 1:
            raise CheckpointError(f"{where}: tensor is not stored contiguously (stride {rebuilt.stride})")
        if not (_is_count(rebuilt.storage_offset) and _is_count(storage_numel) and isinstance(key, str)):
            raise CheckpointError(f"{where}: malformed storage reference {storage!r}")
        member = f"{prefix}data/{key}"
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{where}: tensor record lacks its storage member {member!r}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{where}: compressed tensor data is not supported")
        if (
            info.file_size != storage_numel * self.dtype.itemsize
            or rebuilt.storage_offset + numel(c.sizes) > storage_numel
        ):
            raise CheckpointError(f"{where}: storage size does not match the tensor")
        if not 0 <= info.header_offset <= c.item_length - 30:
            raise CheckpointError(f"{where}: storage member {member!r} lies outside its record")
        local = self._pool.pread(c.path, c.item_offset + info.header_offset, 30)
        if local[:4] != _ZIP_MAGIC:
            raise CheckpointError(f"{where}: storage member {member!r} has a corrupt local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len + rebuilt.storage_offset * self.dtype.itemsize
        if start + want > c.item_length:
            raise CheckpointError(f"{where}: tensor data runs past the end of its record")
        return c.item_offset + start

    @cached_property
    def _starts(self) -> list[int]:
        return [self._locate(c) for c in self._chunks]

    def select(self, index: int, name: str | None = None) -> DcpTensor:
        """The sub-tensor at `index` on dim 0 — one layer of a layer-stacked tensor (megatron-core `torch_dist`
        saves `decoder.layers.*` as [num_layers, ...]) — reading only that layer's bytes of each chunk."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise CheckpointError(f"tensor {self.name!r} {list(self.shape)} has no index {index} on dim 0")
        chunks, starts = [], []
        for c, start in zip(self._chunks, self._starts, strict=True):
            if c.offsets[0] <= index < c.offsets[0] + c.sizes[0]:
                skip = (index - c.offsets[0]) * numel(c.sizes[1:]) * self.dtype.itemsize
                chunks.append(_Chunk(c.offsets[1:], c.sizes[1:], c.path, c.item_offset, c.item_length))
                starts.append(start + skip)
        sub = DcpTensor(name or f"{self.name}[{index}]", self.dtype, self.shape[1:], chunks, self._pool)
        sub.__dict__["_starts"] = starts  # located (and validated) through this tensor's records
        return sub

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


def _state(obj: Any) -> dict[str, Any]:
    return obj.__dict__


def _is_count(value: object) -> bool:
    """A non-negative int (bools are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: object, what: str) -> tuple[int, ...]:
    """`value` (a torch.Size / list / tuple) as a tuple of non-negative ints, or a CheckpointError naming `what`."""
    if isinstance(value, (tuple, list)) and all(_is_count(v) for v in value):
        return tuple(value)
    raise CheckpointError(f"{what} must be a list of non-negative integers, not {value!r}")


def _dtype_of(props: Any) -> str:
    d = _state(props)
    if "dtype" in d:
        return str(d["dtype"])
    return str(d["state"][0])  # TensorProperties.__getstate__ -> (dtype, layout, requires_grad, ...)


def _check_tiling(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], what: str) -> None:
    """The chunk boxes (offsets, sizes) lie inside `shape` and cover it exactly once (no gap, no overlap)."""
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise CheckpointError(f"{what}: chunk at {offsets} of size {sizes} does not have the tensor's rank")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise CheckpointError(f"{what}: chunk at {offsets} of size {sizes} lies outside the shape {shape}")
    if sum(numel(s) for _, s in boxes) != numel(shape):
        raise CheckpointError(f"{what}: chunks do not cover the shape {shape} exactly")
    boxes = [b for b in boxes if numel(b[1])]
    if len(boxes) <= 1:
        return  # in bounds and as large as the tensor: it is the tensor
    # Same total volume, all in bounds: an exact cover unless two chunks overlap. Count the cover on
    # the grid cut by every chunk edge (a handful of cells for FSDP/TP layouts).
    cuts = [sorted({0, d, *(b[0][i] for b in boxes), *(b[0][i] + b[1][i] for b in boxes)}) for i, d in enumerate(shape)]
    if math.prod(len(c) - 1 for c in cuts) <= 1 << 22:
        cover = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
        for offsets, sizes in boxes:
            cover[
                tuple(
                    slice(bisect_left(c, o), bisect_left(c, o + s))
                    for c, o, s in zip(cuts, offsets, sizes, strict=True)
                )
            ] += 1
        if (cover != 1).any():
            raise CheckpointError(f"{what}: chunks overlap (and leave a gap in the shape {shape})")
        return
    lo = np.array([b[0] for b in boxes], dtype=np.int64)
    hi = lo + np.array([b[1] for b in boxes], dtype=np.int64)
    for i in range(len(boxes) - 1):
        if ((lo[i] < hi[i + 1 :]) & (lo[i + 1 :] < hi[i])).all(axis=1).any():
            raise CheckpointError(f"{what}: chunks overlap (and leave a gap in the shape {shape})")


def _load_metadata(
    meta_path: str, real_path: str
) -> tuple[dict[str, Any], dict[tuple[str, tuple[int, ...]], dict[str, Any]]]:
    """(state_dict_metadata, storage info by (fqn, chunk offsets)) from `.metadata`, structurally checked."""
    with open(real_path, "rb") as f:
        raw = f.read()
    try:
        md = safe_pickle.loads(raw, meta_path)
        sd_meta: dict[str, Any] = _state(md)["state_dict_metadata"]
        storage: dict[Any, Any] = _state(md)["storage_data"]
    except Exception as e:
        raise CheckpointError(f"{meta_path}: corrupt or unsupported DCP metadata ({e})") from None
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: corrupt DCP metadata")
    where: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for index, info in storage.items():
        if not isinstance(index, safe_pickle.MetadataIndex) or not isinstance(info, safe_pickle.StorageInfo):
            raise CheckpointError(f"{meta_path}: corrupt DCP metadata (storage entry {index!r})")
        fqn = getattr(index, "fqn", None)
        what = f"{meta_path}: storage entry for {fqn!r}"
        offsets = _counts(getattr(index, "offset", None) or (), f"{what}: offset")
        where[(str(fqn), offsets)] = _state(info)
    return sd_meta, where


def open_dcp(path: str) -> Checkpoint:
    """Read `.metadata` (allow-listed unpickling) and index every tensor chunk.

    Every `.distcp` named by the metadata is resolved with `paths.confined` (inside the folder), and
    every offset, length, shape and chunk box is checked before any tensor byte is read.
    """
    meta_path = os.path.join(path, ".metadata")
    real_meta = confined(path, ".metadata", f"{meta_path}: file")
    if not os.path.isfile(real_meta):
        raise CheckpointError(f"{meta_path}: missing; a DCP checkpoint folder needs its .metadata file")
    sd_meta, where = _load_metadata(meta_path, real_meta)

    pool = FilePool()
    sizes: dict[str, int] = {}
    resolved: dict[str, str] = {}
    tensors: dict[str, DcpTensor] = {}
    entries: list[str] = []
    try:
        for fqn, item in sd_meta.items():
            if not isinstance(item, safe_pickle.TensorStorageMetadata):
                entries.append(fqn)
                continue
            what = f"{meta_path}: tensor {fqn!r}"
            try:
                st = _state(item)
                dtype_name = _dtype_of(st["properties"])
                raw_chunks = [_state(ch) for ch in st["chunks"]]
                size, chunk_boxes = st["size"], [(c["offsets"], c["sizes"]) for c in raw_chunks]
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                raise CheckpointError(f"{what}: malformed tensor metadata ({type(e).__name__}: {e})") from None
            try:
                dtype = from_torch_name(dtype_name)
            except HubconvError as e:
                raise CheckpointError(f"{what}: {e}") from None
            shape = _counts(size, f"{what}: size")
            boxes = [(_counts(o, f"{what}: chunk offsets"), _counts(z, f"{what}: chunk sizes")) for o, z in chunk_boxes]
            _check_tiling(shape, boxes, what)
            chunks = []
            for offsets, csizes in boxes:
                info = where.get((fqn, offsets))
                if info is None:
                    raise CheckpointError(f"{what}: chunk at {offsets} has no storage entry")
                if info.get("transform_descriptors"):
                    raise CheckpointError(
                        f"{what}: uses storage transforms {info['transform_descriptors']} "
                        "(compressed DCP), which hubconv does not read"
                    )
                rel = info.get("relative_path")
                file = resolved.get(rel) if isinstance(rel, str) else None
                if file is None:  # one realpath per .distcp, not per chunk
                    file = resolved[rel] = confined(path, rel, f"{what}: storage path {rel!r}")
                if file not in sizes:
                    if not os.path.isfile(file):
                        raise CheckpointError(f"{file}: missing (listed in {meta_path} for tensor {fqn!r})")
                    sizes[file] = os.path.getsize(file)
                offset, length = info.get("offset"), info.get("length")
                if not (_is_count(offset) and _is_count(length)):
                    raise CheckpointError(f"{what}: storage offset {offset!r} / length {length!r} are not byte counts")
                if offset + length > sizes[file]:
                    raise CheckpointError(
                        f"{file}: truncated: tensor {fqn!r} needs bytes up to {offset + length}, file has {sizes[file]}"
                    )
                chunks.append(_Chunk(offsets, csizes, file, offset, length))
            chunks.sort(key=lambda c: c.offsets)
            tensors[fqn] = DcpTensor(fqn, dtype, shape, chunks, pool)
    except BaseException:
        pool.close()
        raise
    return Checkpoint(path=path, format="dcp", tensors=dict(tensors), entries=entries, closers=[pool.close])
