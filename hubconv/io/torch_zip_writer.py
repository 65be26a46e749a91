"""Streaming `torch.save` writer: a zip loadable by `torch.load(weights_only=True)`, written tensor by tensor.

`torch.save(obj)` needs every tensor of `obj` in memory. This writer takes a nested object whose tensors are
`TensorRef`s over lazy tensors (`hubconv.io.tensor.LazyTensor`) and lays the archive out from metadata alone,
as torch/serialization.py `_save` and its zip writer (`PyTorchStreamWriter`) do:

- `<archive>/data.pkl`: the object, pickled with protocol 2; each tensor is
  `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` and each storage a
  persistent id `('storage', torch.<T>Storage, key, 'cpu', numel)` (keys `"0"`, `"1"`, ... in pickling order;
  refs to the same lazy tensor share one storage, as tied weights do in a real state dict);
- `.format_version`, `.storage_alignment` (64), `byteorder`, then `data/<key>` (raw little-endian storage bytes,
  every record's data 64-byte aligned through an `FB` padding extra field), `version` and
  `.data/serialization_id`, all stored uncompressed;
- zip64 records where sizes or offsets pass 4 GiB.

Tensor bytes move from their source files inside the kernel when they need no transform
(`copy_file_range`, through the safetensors writer's copier); CRC-32s are computed on the way (the source
bytes are read once more from the page cache). The pickle is generated here, without torch; its globals are
exactly those torch's weights-only unpickler allows, plus `argparse.Namespace` (Megatron's `args`), which
needs `torch.serialization.add_safe_globals([argparse.Namespace])` before `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hubconv.dtypes import DType, cast
from hubconv.errors import OutputError
from hubconv.io.tensor import LazyTensor, contiguous_strides, numel
from hubconv.io.writer import _Copier, _write_all
from hubconv.views import blocks as view_blocks

ALIGNMENT = 64  # torch's storage alignment (`_get_storage_alignment`)
FORMAT_VERSION = "3\n"  # PyTorchStreamWriter's `version` record
_STORAGE_TYPES = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage",
    "float8_e4m3fn": "Float8_e4m3fnStorage",
    "float8_e5m2": "Float8_e5m2Storage",
}
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on go to zip64 fields
_MAX32 = 0xFFFFFFFF  # the 32-bit field value meaning "see the zip64 field"


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside the object to save: `tensor`'s data, stored as `dtype` (default: its own)."""

    tensor: LazyTensor
    dtype: DType | None = None

    @property
    def out_dtype(self) -> DType:
        return self.dtype or self.tensor.dtype


@dataclass(frozen=True)
class Global:
    """A module-level name (`torch.bfloat16`, a class) as a value inside the object."""

    module: str
    name: str


def torch_dtype(name: str) -> Global:
    """`torch.<name>` (e.g. Megatron's `args.params_dtype`)."""
    return Global("torch", name)


@dataclass(frozen=True)
class Reduce:
    """`func(*args)` at load time (`func` a `Global`), as `__reduce__` pickles torch.Size and enums."""

    func: Global
    args: tuple[Any, ...]


class Items(tuple):
    """A dict given as (key, value) pairs, for keys that are pickled objects (DCP's `MetadataIndex`)."""


@dataclass(frozen=True)
class NewObject:
    """`cls.__new__(cls)` then `BUILD` with `state` (a dataclass's `__dict__`, or its `__getstate__` value)."""

    cls: Global
    state: Any


# ----------------------------------------------------------------------------------- pickle (protocol 2)


class _Pickle:
    """A minimal protocol-2 pickler for state-dict shaped objects (dict, list, tuple, str, int, float, bool,
    None, bytes-free), `TensorRef`s and `argparse.Namespace`, emitting only opcodes torch's weights-only
    unpickler understands."""

    def __init__(self) -> None:
        self.out: list[bytes] = [b"\x80\x02"]
        self.storages: list[TensorRef] = []  # in key order
        self._keys: dict[tuple[int, str], str] = {}

    def _str(self, s: str) -> None:
        raw = s.encode("utf-8")
        self.out.append(b"X" + struct.pack("<I", len(raw)) + raw)

    def _global(self, module: str, name: str) -> None:
        self.out.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out.append(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.out.append(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.out.append(b"J" + struct.pack("<i", v))
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out.append(b"\x8a" + bytes([len(raw)]) + raw)

    def _tuple(self, items: tuple[Any, ...] | list[Any]) -> None:
        if not items:
            self.out.append(b")")
            return
        if len(items) <= 3:
            for x in items:
                self.dump(x)
            self.out.append(b"\x85\x86\x87"[len(items) - 1 : len(items)])
            return
        self.out.append(b"(")
        for x in items:
            self.dump(x)
        self.out.append(b"t")

    def _tensor(self, ref: TensorRef) -> None:
        t = ref.tensor
        key = self._keys.get((id(t), ref.out_dtype.name))
        if key is None:  # one storage per (lazy tensor, dtype): tied weights share theirs, as in torch
            key = self._keys[(id(t), ref.out_dtype.name)] = str(len(self.storages))
            self.storages.append(ref)
        storage = _STORAGE_TYPES.get(ref.out_dtype.torch_name)
        if storage is None:
            raise OutputError(f"tensor {t.name!r}: dtype {ref.out_dtype} has no torch storage type")
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.append(b"(")  # args of _rebuild_tensor_v2
        self.out.append(b"(")  # persistent id tuple
        self._str("storage")
        self._global("torch", storage)
        self._str(key)
        self._str("cpu")
        self._int(numel(t.shape))
        self.out.append(b"tQ")
        self._int(0)  # storage offset
        self._tuple(tuple(t.shape))
        self._tuple(contiguous_strides(tuple(t.shape)))
        self.out.append(b"\x89")  # requires_grad False
        self._global("collections", "OrderedDict")
        self.out.append(b")R")  # OrderedDict() backward hooks
        self.out.append(b"tR")

    def dump(self, obj: Any) -> None:
        if isinstance(obj, TensorRef):
            self._tensor(obj)
        elif isinstance(obj, Global):
            self._global(obj.module, obj.name)
        elif isinstance(obj, Reduce):
            self._global(obj.func.module, obj.func.name)
            self._tuple(obj.args)
            self.out.append(b"R")
        elif isinstance(obj, NewObject):
            self._global(obj.cls.module, obj.cls.name)
            self.out.append(b")\x81")
            self.dump(obj.state)
            self.out.append(b"b")
        elif obj is None:
            self.out.append(b"N")
        elif obj is True or obj is False:
            self.out.append(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            self.out.append(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, Items):
            self.out.append(b"}")
            self._pairs(list(obj))
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            self.out.append(b"]")
            if obj:
                self.out.append(b"(")
                for x in obj:
                    self.dump(x)
                self.out.append(b"e")
        elif isinstance(obj, OrderedDict):
            self._global("collections", "OrderedDict")
            self.out.append(b")R")
            self._items(obj)
        elif isinstance(obj, Mapping):
            self.out.append(b"}")
            self._items(obj)
        elif isinstance(obj, argparse.Namespace):
            self._global("argparse", "Namespace")
            self.out.append(b")\x81}")  # Namespace.__new__(Namespace), then its __dict__ as BUILD state
            self._items(vars(obj))
            self.out.append(b"b")
        else:
            raise OutputError(f"cannot store a {type(obj).__name__} in a torch file: {obj!r:.60}")

    def _items(self, d: Mapping[Any, Any]) -> None:
        self._pairs(list(d.items()))

    def _pairs(self, pairs: list[tuple[Any, Any]]) -> None:
        if not pairs:
            return
        self.out.append(b"(")
        for k, v in pairs:
            self.dump(k)
            self.dump(v)
        self.out.append(b"u")

    def result(self) -> bytes:
        return b"".join(self.out) + b"."


def pickle_object(obj: Any) -> tuple[bytes, list[TensorRef]]:
    """(data.pkl bytes, the storages in key order) for `obj`."""
    p = _Pickle()
    p.dump(obj)
    return p.result(), p.storages


# ----------------------------------------------------------------------------------------------- zip layout


@dataclass
class _Record:
    name: str
    size: int
    data: bytes | None = None  # small records; None: a tensor storage
    ref: TensorRef | None = None
    header_offset: int = 0
    data_offset: int = 0
    crc: int = 0

    @property
    def zip64(self) -> bool:
        return self.size >= _ZIP64_LIMIT or self.header_offset >= _ZIP64_LIMIT


def _local_header(rec: _Record, extra: bytes) -> bytes:
    size = _MAX32 if rec.size >= _ZIP64_LIMIT else rec.size
    name = rec.name.encode()
    version = 45 if rec.zip64 else 20
    # signature, version needed, flags (UTF-8 names), stored, time, date (1980-01-01), crc, sizes, name/extra lengths
    fields = (0x04034B50, version, 0x800, 0, 0, 0x21, rec.crc, size, size, len(name), len(extra))
    return struct.pack("<IHHHHHIIIHH", *fields) + name + extra


def _local_extra(rec: _Record, header_offset: int) -> bytes:
    """zip64 sizes (when needed) plus torch's `FB` padding so that the data starts 64-byte aligned."""
    z64 = struct.pack("<HHQQ", 1, 16, rec.size, rec.size) if rec.size >= _ZIP64_LIMIT else b""
    start = header_offset + 30 + len(rec.name.encode()) + len(z64) + 4
    pad = -start % ALIGNMENT
    return z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad


def plan_records(archive: str, pickled: bytes, storages: list[TensorRef], serialization_id: str) -> list[_Record]:
    """Records in torch's order with their header and data offsets."""
    recs = [
        _Record(f"{archive}/data.pkl", len(pickled), pickled),
        _Record(f"{archive}/.format_version", 1, b"1"),
        _Record(f"{archive}/.storage_alignment", 2, b"64"),
        _Record(f"{archive}/byteorder", 6, b"little"),
    ]
    for key, ref in enumerate(storages):
        recs.append(_Record(f"{archive}/data/{key}", numel(ref.tensor.shape) * ref.out_dtype.itemsize, ref=ref))
    recs.append(_Record(f"{archive}/version", len(FORMAT_VERSION), FORMAT_VERSION.encode()))
    recs.append(_Record(f"{archive}/.data/serialization_id", 40, serialization_id.encode()))
    pos = 0
    for rec in recs:
        rec.header_offset = pos
        extra = _local_extra(rec, pos)
        rec.data_offset = pos + 30 + len(rec.name.encode()) + len(extra)
        pos = rec.data_offset + rec.size
        if rec.data is not None:
            rec.crc = zlib.crc32(rec.data)
    return recs


def central_directory(recs: list[_Record], start: int) -> bytes:
    """Central directory plus (zip64) end records, for a directory written at `start`."""
    out = []
    need64 = start >= _ZIP64_LIMIT or len(recs) >= 0xFFFF
    for rec in recs:
        fields = []
        if rec.size >= _ZIP64_LIMIT:
            fields += [rec.size, rec.size]
        if rec.header_offset >= _ZIP64_LIMIT:
            fields.append(rec.header_offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        need64 |= bool(fields)
        size = _MAX32 if rec.size >= _ZIP64_LIMIT else rec.size
        offset = _MAX32 if rec.header_offset >= _ZIP64_LIMIT else rec.header_offset
        name = rec.name.encode()
        version = 45 if fields else 20
        # the local header's fields plus version made by, comment length, disk, attributes, header offset
        head = (0x02014B50, version, version, 0x800, 0, 0, 0x21, rec.crc, size, size, len(name), len(extra))
        out.append(struct.pack("<IHHHHHHIIIHHHHHII", *head, 0, 0, 0, 0, offset) + name + extra)
    cd = b"".join(out)
    end = start + len(cd)
    tail = b""
    if need64:
        tail += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(recs), len(recs), len(cd), start)
        tail += struct.pack("<IIQI", 0x07064B50, 0, end, 1)
    n = min(len(recs), 0xFFFF)
    tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, min(len(cd), _MAX32), _MAX32 if need64 else start, 0)
    return cd + tail


def _serialization_id(pickled: bytes, storages: list[TensorRef]) -> str:
    """A 40-digit id as torch writes one; derived from the content, so identical imports are identical files."""
    h = hashlib.sha256(pickled)
    for ref in storages:
        h.update(f"{ref.tensor.name}:{ref.out_dtype}:{list(ref.tensor.shape)}".encode())
    return str(int.from_bytes(h.digest(), "big"))[-40:].rjust(40, "0")


def _tensor_bytes(ref: TensorRef, what: str) -> Iterator[memoryview]:
    for block in view_blocks(ref.tensor):
        out = cast(block, ref.tensor.dtype, ref.out_dtype, what=what)
        yield memoryview(np.ascontiguousarray(out)).cast("B")


def _write_storage(fd: int, base: int, rec: _Record, copier: _Copier, progress: Callable[[int], None]) -> int:
    """Write one storage at its planned offset (the archive starts at `base` in `fd`); returns its CRC-32."""
    assert rec.ref is not None
    t, pos, crc = rec.ref.tensor, base + rec.data_offset, 0
    what = f"tensor {t.name!r}"
    segments = t.segments() if rec.ref.out_dtype is t.dtype else None
    if segments is not None:
        for seg in segments:
            copier.copy(seg.path, seg.offset, fd, pos, seg.nbytes)
            src = copier._src(seg.path)
            done = 0
            while done < seg.nbytes:
                chunk = os.pread(src, min(1 << 20, seg.nbytes - done), seg.offset + done)
                if not chunk:
                    raise OutputError(f"{seg.path}: ended early while reading {what}")
                crc = zlib.crc32(chunk, crc)
                done += len(chunk)
            pos += seg.nbytes
            progress(seg.nbytes)
    else:
        for data in _tensor_bytes(rec.ref, what):
            crc = zlib.crc32(data, crc)
            _write_all(fd, data, pos)
            pos += len(data)
            progress(len(data))
    if pos != base + rec.data_offset + rec.size:
        raise OutputError(f"{what}: produced {pos - base - rec.data_offset} bytes, planned {rec.size}")
    return crc


class TorchZip:
    """One planned torch.save archive: its size is known before any byte is written."""

    def __init__(self, obj: Any, archive: str):
        pickled, self.storages = pickle_object(obj)
        self.records = plan_records(archive, pickled, self.storages, _serialization_id(pickled, self.storages))
        self.cd_offset = self.records[-1].data_offset + self.records[-1].size
        self.size = self.cd_offset + len(central_directory(self.records, self.cd_offset))

    def write(self, fd: int, base: int, copier: _Copier, progress: Callable[[int], None] | None = None) -> None:
        """Write the archive at offset `base` of `fd` (zip offsets are relative to the archive's start)."""
        for rec in self.records:
            if rec.data is not None:
                _write_all(fd, memoryview(rec.data), base + rec.data_offset)
            else:
                rec.crc = _write_storage(fd, base, rec, copier, progress or (lambda n: None))
            extra = _local_extra(rec, rec.header_offset)
            _write_all(fd, memoryview(_local_header(rec, extra)), base + rec.header_offset)
        tail = central_directory(self.records, self.cd_offset)
        _write_all(fd, memoryview(tail), base + self.cd_offset)


def write_torch_file(
    path: str,
    obj: Any,
    *,
    archive: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write `obj` (with `TensorRef`s for tensors) as a torch.save zip at `path`; returns the file size.

    `archive` is the zip's top folder (torch uses the file name without its extension)."""
    archive = archive or os.path.splitext(os.path.basename(path))[0] or "archive"
    plan = TorchZip(obj, archive)
    copier = _Copier()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        plan.write(fd, 0, copier, progress)
        os.ftruncate(fd, plan.size)
    finally:
        os.close(fd)
        copier.close()
    return plan.size
