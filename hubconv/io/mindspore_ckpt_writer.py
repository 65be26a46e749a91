"""Streaming MindSpore `.ckpt` writer (protobuf, without MindSpore and without the protobuf package).

The layout `hubconv.io.mindspore_ckpt` reads and MindSpore's `save_checkpoint` writes: a concatenation of
`Checkpoint.value` fields (field 1, length-delimited), each a `Value { tag = 1 (string); tensor = 2 (TensorProto) }`
with `TensorProto { dims = 1 (int64, one field per dim); tensor_type = 2 (string, e.g. "BFloat16");
tensor_content = 3 (bytes) }`. Every length is known from shapes alone, so each record's header is written and
its content follows straight from the source: kernel copies for untransformed tensors, row blocks otherwise.
Tensors above `CHUNK_BYTES` are written as consecutive Values under the same tag and dims, each holding the next
whole rows (MindSpore's older `np.array_split` cut; `load_checkpoint` joins consecutive chunks of a tag).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from hubconv import views as V
from hubconv.dtypes import DType, cast
from hubconv.errors import OutputError
from hubconv.io.tensor import LazyTensor, numel, rows
from hubconv.io.writer import _Copier, _write_all
from hubconv.views import blocks as view_blocks

CHUNK_BYTES = 512 << 20  # MindSpore splits parameters above 512 MiB
TENSOR_TYPES = {"F32": "Float32", "F16": "Float16", "BF16": "BFloat16", "F64": "Float64", "I64": "Int64",
                "I32": "Int32", "I16": "Int16", "I8": "Int8", "U8": "UInt8", "BOOL": "Bool"}  # fmt: skip


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload_len: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(payload_len)


def record_header(tag: str, dims: Sequence[int], tensor_type: str, content_len: int) -> bytes:
    """Everything of one `value` field up to (not including) its tensor content bytes."""
    name, kind = tag.encode("utf-8"), tensor_type.encode()
    tp = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in dims) + _len_field(2, len(kind)) + kind
    tp += _len_field(3, content_len)
    tensor_len = len(tp) + content_len
    value = _len_field(1, len(name)) + name + _len_field(2, tensor_len)
    return _len_field(1, len(value) + tensor_len) + value + tp


def _chunks(t: LazyTensor, itemsize: int) -> list[LazyTensor]:
    total = numel(t.shape) * itemsize
    if total <= CHUNK_BYTES or len(t.shape) < 1:
        return [t]
    per_row = max(1, total // rows(t.shape))
    step = max(1, CHUNK_BYTES // per_row)
    return [V.slice_rows(t, lo, min(lo + step, t.shape[0])) for lo in range(0, t.shape[0], step)]


def write_mindspore_ckpt(
    path: str,
    tensors: Sequence[LazyTensor],
    *,
    dtype: DType | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write `tensors` (tags = their names; cast to `dtype` when given) as a MindSpore `.ckpt`; returns its size."""
    copier, pos = _Copier(), 0
    report = progress or (lambda n: None)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            out = dtype or t.dtype
            kind = TENSOR_TYPES.get(out.name)
            if kind is None:
                raise OutputError(f"tensor {t.name!r}: dtype {out} has no MindSpore tensor_type")
            dims = list(t.shape) or [0]  # MindSpore writes a scalar as dims [0]
            for chunk in _chunks(t, out.itemsize):
                size = numel(chunk.shape) * out.itemsize
                head = record_header(t.name, dims, kind, size)
                _write_all(fd, memoryview(head), pos)
                pos += len(head)
                segments = chunk.segments() if out is t.dtype else None
                if segments is not None:
                    for seg in segments:
                        copier.copy(seg.path, seg.offset, fd, pos, seg.nbytes)
                        pos += seg.nbytes
                        report(seg.nbytes)
                else:
                    for block in view_blocks(chunk):
                        data = memoryview(np.ascontiguousarray(cast(block, t.dtype, out, what=t.name))).cast("B")
                        _write_all(fd, data, pos)
                        pos += len(data)
                        report(len(data))
        os.ftruncate(fd, pos)
    finally:
        os.close(fd)
        copier.close()
    return pos
