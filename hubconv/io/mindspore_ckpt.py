"""MindSpore `.ckpt` files, read without MindSpore and without the protobuf package.

Layout (MindSpore's `checkpoint.proto`, proto2, and `mindspore.train.serialization`):

    message Checkpoint { message Value { required string tag = 1; TensorProto tensor = 2;
                                         MapTensorProto maptensor = 3; }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

`save_checkpoint` writes one serialized `Checkpoint` per value, back to back: the file is a
concatenation of messages, i.e. one message with many `value` fields. A parameter larger than
512 MiB is written as several consecutive Values under the same tag and the same dims, each with
the next chunk of its bytes (`_write_parameter_bytes_data` cuts the bytes, older versions cut rows
with `np.array_split`); `load_checkpoint` joins consecutive chunks of a tag. `dims == [0]` (and no
dims) is a scalar. `tensor_type` is `str(dtype)`: `Float32`, `Float16`, `BFloat16`, `Float64`,
`Int8/16/32/64`, `UInt8/16/32/64` (old spelling `Uint8`), `Bool`; `str` holds a UTF-32 string
from `append_dict`, `random_op` a random-generator state. With `crc_check=True` the file ends with
`b"crc_num"` and a 10-byte big-endian CRC32 of everything before it.

Here each tensor becomes a lazy tensor whose `segments()` are its `tensor_content` byte ranges in
the file (several for a split tensor), so the writer copies them in the kernel. The file is walked
through a small window (`hubconv.io.protobuf.stream_fields`), never loaded, and validated before
anything is returned: varints and lengths in range and inside the file, a tag per value (UTF-8,
not path-like), known dims and dtype, chunks of one tensor with equal dims and dtype, content
length = prod(dims) × itemsize (MindSpore's own loader does not check), no tag twice. A CRC
trailer is verified. Non-tensor values (strings, random-op state, map parameters, dtypes hubconv
has no name for) are listed in `entries` (strings also in `values`).

A folder `rank_N/` per rank (MindFormers' output layout) is read as one checkpoint when there is
one rank, or when every rank holds identical tensors (data-parallel replicas); ranks that differ
are shards of a distributed model, which only MindSpore's strategy files can merge: refused.
"""

from __future__ import annotations

import binascii
import os
import re
from dataclasses import dataclass

import numpy as np

from hubconv.dtypes import BY_NAME, DType
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.paths import confined
from hubconv.io.protobuf import LEN, VARINT, ProtobufError, decode_varint, file_reader, stream_fields, to_int64
from hubconv.io.tensor import Segment, numel, row_blocks

CRC_MARK = b"crc_num"
CRC_TRAILER = len(CRC_MARK) + 10
MAX_TAG_BYTES = 4096
MAX_TYPE_BYTES = 64
MAX_DIMS = 16
CRC_BLOCK = 8 << 20

# tensor_type -> hubconv dtype (MindSpore's `tensor_to_ms_type` keys, older spellings, numpy names in map tensors).
DTYPES: dict[str, DType] = {
    "Float32": BY_NAME["F32"],
    "Float16": BY_NAME["F16"],
    "BFloat16": BY_NAME["BF16"],
    "Float64": BY_NAME["F64"],
    "Int8": BY_NAME["I8"],
    "Int16": BY_NAME["I16"],
    "Int32": BY_NAME["I32"],
    "Int64": BY_NAME["I64"],
    "UInt8": BY_NAME["U8"],
    "Uint8": BY_NAME["U8"],
    "Bool": BY_NAME["BOOL"],
    "float32": BY_NAME["F32"],
    "float16": BY_NAME["F16"],
    "bfloat16": BY_NAME["BF16"],
    "float64": BY_NAME["F64"],
    "int8": BY_NAME["I8"],
    "int16": BY_NAME["I16"],
    "int32": BY_NAME["I32"],
    "int64": BY_NAME["I64"],
    "uint8": BY_NAME["U8"],
    "bool": BY_NAME["BOOL"],
}
# MindSpore types hubconv has no tensor dtype for: kept as named entries (a model weight of such a type fails mapping).
OTHER_TYPES = {"UInt16": 2, "UInt32": 4, "UInt64": 8, "Uint16": 2, "Uint32": 4, "Uint64": 8}
_BAD_TAG = re.compile(r"[\x00-\x1f\x7f/\\]")


class MindSporeTensor:
    """A tensor stored as one or more `tensor_content` byte ranges of a `.ckpt` file."""

    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...], path: str, ranges: list[tuple[int, int]], pool):
        self.name, self.dtype, self.shape, self._path, self._pool = name, dtype, shape, path, pool
        self._ranges = ranges
        self._starts = np.cumsum([0] + [n for _, n in ranges])

    def segments(self) -> list[Segment] | None:
        return [Segment(self._path, off, n) for off, n in self._ranges if n]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        row = numel(self.shape[1:]) * self.dtype.itemsize
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype.np)
        flat = out.reshape(-1).view(np.uint8)
        lo, hi = start * row, stop * row
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1
        done = 0
        while lo + done < hi:
            off, n = self._ranges[i]
            first = int(self._starts[i])
            a = lo + done - first
            take = min(n - a, hi - lo - done)
            if take > 0:
                self._pool.pread_into(self._path, off + a, flat[done : done + take])
                done += take
            i += 1
        return out


@dataclass
class _Value:
    tag: str
    kind: str  # "tensor", "map", "other"
    dims: tuple[int, ...] = ()
    ttype: str = ""
    content: tuple[int, int] = (0, 0)
    index: int = 0


def is_mindspore_ckpt(path: str, head: bytes) -> bool:
    """`0a <len> 0a <len> <tag>`: a Checkpoint whose first Value starts with its tag (what save_checkpoint writes)."""
    if len(head) < 4 or head[0] != 0x0A:
        return False
    try:
        size, pos = decode_varint(head, 1, len(head), "head")
        if size < 2 or pos >= len(head) or head[pos] != 0x0A:
            return False
        tag_len, pos = decode_varint(head, pos + 1, len(head), "head")
    except ProtobufError:
        return False
    tag = head[pos : pos + tag_len]
    return 1 <= tag_len < size and all(0x20 <= b < 0x7F for b in tag)


def _string(read, off: int, n: int, limit: int, what: str) -> str:
    if n > limit:
        raise CheckpointError(f"{what} is {n} bytes long (at most {limit} expected)")
    data = read(off, n)
    if len(data) != n:
        raise CheckpointError(f"{what}: file is truncated")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not valid UTF-8") from None


def _check_tag(tag: str, what: str) -> None:
    if not tag:
        raise CheckpointError(f"{what}: empty tag")
    if _BAD_TAG.search(tag) or tag.startswith(".") or ".." in tag.split("."):
        raise CheckpointError(f"{what}: tag {tag!r} is not a parameter name (path-like or control characters)")


def _walk(path: str, read, end: int) -> list[_Value]:
    values: list[_Value] = []
    for index, (number, wire, val) in enumerate(stream_fields(read, 0, end, f"{path}: Checkpoint")):
        what = f"{path}: Checkpoint.value[{index}]"
        if number != 1 or wire != LEN:
            raise CheckpointError(f"{what}: unexpected field {number} (wire type {wire}); expected value = 1")
        off, n = val
        v = _Value(tag="", kind="other", index=index)
        tensor_range = None
        for f, w, x in stream_fields(read, off, off + n, what):
            if f == 1 and w == LEN:
                v.tag = _string(read, x[0], x[1], MAX_TAG_BYTES, f"{what}.tag")
            elif f == 2 and w == LEN:
                tensor_range = x
            elif f == 3 and w == LEN:
                v.kind = "map"
            elif f in (1, 2, 3):
                raise CheckpointError(f"{what}: field {f} has wire type {w}, expected 2 (length-delimited)")
        _check_tag(v.tag, what)
        what = f"{path}: {v.tag!r} (Checkpoint.value[{index}])"
        if tensor_range is not None and tensor_range[1] and v.kind != "map":
            _tensor(read, v, tensor_range, what)
        values.append(v)
    return values


def _tensor(read, v: _Value, rng: tuple[int, int], what: str) -> None:
    dims: list[int] = []
    ttype, content = None, None
    for f, w, x in stream_fields(read, rng[0], rng[0] + rng[1], f"{what}.tensor"):
        if f == 1 and w == VARINT:
            dims.append(to_int64(x))
        elif f == 1 and w == LEN:  # packed dims
            buf, pos = read(x[0], x[1]), 0
            while pos < len(buf):
                d, pos = decode_varint(buf, pos, len(buf), f"{what}.tensor.dims", x[0])
                dims.append(to_int64(d))
        elif f == 2 and w == LEN:
            ttype = _string(read, x[0], x[1], MAX_TYPE_BYTES, f"{what}.tensor.tensor_type")
        elif f == 3 and w == LEN:
            content = x
        elif f in (1, 2, 3):
            raise CheckpointError(f"{what}: tensor field {f} has wire type {w}")
        if len(dims) > MAX_DIMS:
            raise CheckpointError(f"{what}: more than {MAX_DIMS} dims")
    if ttype is None:
        raise CheckpointError(f"{what}: tensor without tensor_type")
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{what}: negative dims {dims}")
    v.kind, v.dims, v.ttype, v.content = "tensor", tuple(dims), ttype, content or (0, 0)


def _verify_crc(path: str, pool: FilePool, end: int, stored: int) -> None:
    crc, pos = 0, 0
    while pos < end:
        n = min(CRC_BLOCK, end - pos)
        crc = binascii.crc32(pool.pread(path, pos, n), crc)
        pos += n
    if crc != stored:
        raise CheckpointError(
            f"{path}: CRC check failed (stored crc_num {stored}, computed {crc}): the file is damaged"
        )


def open_mindspore_ckpt(path: str, *, verify_crc: bool = True) -> Checkpoint:
    """Open a MindSpore `.ckpt` lazily (see the module docstring for what is validated)."""
    pool = FilePool()
    try:
        return _open(path, pool, verify_crc)
    except BaseException:
        pool.close()
        raise


def _open(path: str, pool: FilePool, verify_crc: bool) -> Checkpoint:
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a MindSpore checkpoint")
    read = file_reader(pool.fd(path))
    end, crc = size, None
    if size >= CRC_TRAILER:
        tail = read(size - CRC_TRAILER, CRC_TRAILER)
        if tail[: len(CRC_MARK)] == CRC_MARK:
            end, crc = size - CRC_TRAILER, int.from_bytes(tail[len(CRC_MARK) :], "big")
    try:
        values = _walk(path, read, end)
    except ProtobufError as e:
        raise CheckpointError(str(e)) from None
    if not values:
        raise CheckpointError(f"{path}: no values, not a MindSpore checkpoint")
    if crc is not None and verify_crc:
        _verify_crc(path, pool, end, crc)
    tensors, entries, extra = _assemble(path, values, pool, read)
    extra["crc_num"] = crc
    return Checkpoint(
        path=path, format="mindspore-ckpt", tensors=tensors, entries=entries, values=extra, closers=[pool.close]
    )


def _assemble(path: str, values: list[_Value], pool: FilePool, read) -> tuple[dict, list[str], dict]:
    """Group consecutive chunks of a tag into one tensor; validate dtype, dims and the content length."""
    tensors: dict = {}
    entries: list[str] = []
    extra: dict = {}
    seen: dict[str, int] = {}
    i = 0
    while i < len(values):
        v = values[i]
        j = i + 1
        while j < len(values) and values[j].tag == v.tag:
            j += 1
        chunks = values[i:j]
        what = f"{path}: {v.tag!r}"
        if v.tag in seen:
            raise CheckpointError(
                f"{what} appears again at Checkpoint.value[{v.index}] after other values (first at "
                f"Checkpoint.value[{seen[v.tag]}])"
            )
        seen[v.tag] = v.index
        i = j
        if any(c.kind != v.kind for c in chunks) or any((c.dims, c.ttype) != (v.dims, v.ttype) for c in chunks):
            raise CheckpointError(f"{what}: its {len(chunks)} chunks disagree on dims or tensor_type")
        if v.kind == "map":
            entries.append(v.tag)
            extra[v.tag] = "MindSpore MapParameter (embedding hash table)"
            continue
        if v.kind != "tensor":
            raise CheckpointError(f"{what}: a value without tensor data (Checkpoint.value[{v.index}])")
        nbytes = sum(c.content[1] for c in chunks)
        if v.ttype == "str":  # append_dict strings: numpy UTF-32 (little-endian) text
            data = b"".join(read(c.content[0], c.content[1]) for c in chunks) if nbytes <= 1 << 20 else b""
            try:
                extra[v.tag] = data.decode("utf-32-le").rstrip("\x00")
            except UnicodeDecodeError:
                extra[v.tag] = None
            entries.append(v.tag)
            continue
        if v.ttype == "random_op" or v.ttype in OTHER_TYPES:
            entries.append(v.tag)
            extra[v.tag] = f"{v.ttype} value"
            continue
        dtype = DTYPES.get(v.ttype)
        if dtype is None:
            raise CheckpointError(f"{what}: unknown tensor_type {v.ttype!r}")
        shape = () if v.dims in ((), (0,)) else v.dims
        want = numel(shape) * dtype.itemsize
        if nbytes != want:
            chunked = f" in {len(chunks)} chunks" if len(chunks) > 1 else ""
            raise CheckpointError(
                f"{what}: tensor_content holds {nbytes} bytes{chunked}, but {v.ttype} dims {list(v.dims)} need {want}"
            )
        tensors[v.tag] = MindSporeTensor(v.tag, dtype, shape, path, [c.content for c in chunks], pool)
    return tensors, entries, extra


# ---------------------------------------------------------------------------------------------- rank folders

_RANK = re.compile(r"^rank_(\d+)$")
_WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


def is_rank_folder(path: str, head: bytes) -> bool:
    """A folder of `rank_N/` subfolders holding `.ckpt` or `.safetensors` files (MindFormers' output layout)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    ranks = [n for n in names if _RANK.match(n) and os.path.isdir(os.path.join(path, n))]
    return bool(ranks) and any(f.endswith(_WEIGHT_SUFFIXES) for r in ranks for f in os.listdir(os.path.join(path, r)))


def _same(a, b) -> bool:
    """Equal dtype and bytes, compared block by block."""
    if a.dtype is not b.dtype:
        return False
    return all(
        np.array_equal(a.read_rows(lo, hi).view(np.uint8), b.read_rows(lo, hi).view(np.uint8))
        for lo, hi in row_blocks(a.shape, a.dtype.itemsize)
    )


def open_rank_folder(path: str) -> Checkpoint:
    """rank_0 .. rank_{n-1}, one weight file each; one rank, or identical replicas, read as rank_0's checkpoint."""
    from hubconv.io.checkpoint import open_checkpoint

    ranks = sorted((int(m.group(1)), n) for n in os.listdir(path) if (m := _RANK.match(n)))
    numbers = [r for r, _ in ranks]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise CheckpointError(f"{path}: rank folders are not rank_0..rank_{max(numbers)} (missing rank_{missing[0]})")
    files = []
    for _, name in ranks:
        folder = confined(path, name, f"{path}: {name}")
        found = sorted(f for f in os.listdir(folder) if f.endswith(_WEIGHT_SUFFIXES) and "strategy" not in f)
        if len(found) != 1:
            listed = ", ".join(found) or "none"
            raise CheckpointError(
                f"{path}/{name}: expected one .ckpt or .safetensors file, found {listed}; keep one step per rank"
            )
        files.append(confined(path, os.path.join(name, found[0]), f"{path}/{name}/{found[0]}"))
    opened = [open_checkpoint(f) for f in files]
    try:
        first = opened[0]
        for k, other in enumerate(opened[1:], start=1):
            shapes = {n: t.shape for n, t in first.tensors.items()}
            theirs = {n: t.shape for n, t in other.tensors.items()}
            if shapes != theirs or not all(_same(first.tensors[n], other.tensors[n]) for n in shapes):
                raise CheckpointError(
                    f"{path}: rank_{k} holds different tensors than rank_0: a distributed (sharded) checkpoint; "
                    "merging it needs MindSpore's parallel strategy file, which hubconv does not read. Merge it "
                    "with mindspore.transform_checkpoints (or MindFormers' auto_trans_ckpt) into one rank first"
                )
    except BaseException:
        for c in opened:
            c.close()
        raise
    for c in opened[1:]:
        c.close()
    first.values["ranks"] = len(opened)
    first.values["rank_files"] = [os.path.relpath(f, os.path.realpath(path)) for f in files]
    return first
