"""Lazy reader for `torch.save` zip files (`.pt`, `.pth`, `.ckpt`) without torch and without `weights_only=False`.

Layout (torch >= 1.6): a zip archive whose members are all stored uncompressed: `<archive>/data.pkl`
(the pickled object, with tensors as `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and storages as persistent ids `('storage', <type>, key, location, numel)`),
`<archive>/data/<key>` (each storage's raw bytes), `<archive>/byteorder`, `<archive>/version`.

Written by hand because `torch.load` either runs arbitrary pickled code (`weights_only=False`) or
refuses the inert Python objects training checkpoints carry (argparse `Namespace`, OmegaConf
configs, numpy RNG state), and because hubconv wants each tensor as a *file segment*: the bytes of
an untransformed tensor are then copied into the output inside the kernel. `data.pkl` is walked
with the allow-list unpickler (`safe_pickle`), whose stand-ins keep non-tensor values inert; the
archive's members are bounded before anything is read (`torch_zip`).
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from hubconv.dtypes import DType, from_torch_name
from hubconv.errors import CheckpointError, HubconvError
from hubconv.io import safe_pickle, torch_zip
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.files import FilePool
from hubconv.io.tensor import Segment, contiguous_strides, numel
from hubconv.io.window import Window

MAX_PICKLE = 256 * 1024 * 1024  # data.pkl of a large training checkpoint (optimizer ids, RNG states): tens of MiB
MAX_DEPTH = 64


class ZipTensor:
    """One tensor of a torch zip file: a strided view of a stored storage member."""

    def __init__(
        self,
        name: str,
        dtype: DType,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        path: str,
        start: int,
        pool: FilePool,
    ):
        self.name, self.dtype, self.shape, self._stride = name, dtype, shape, stride
        self._path, self._start, self._pool = path, start, pool  # start: absolute offset of element 0
        # Row-major in its storage (strides of size-1 dims do not matter): bytes can move untouched.
        self.contiguous = all(
            n <= 1 or st == e for n, st, e in zip(shape, stride, contiguous_strides(shape), strict=True)
        )

    def segments(self) -> list[Segment] | None:
        if not self.contiguous:
            return None
        return [Segment(self._path, self._start, numel(self.shape) * self.dtype.itemsize)]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        if not self.shape:
            return self._pool.pread_into(self._path, self._start, np.empty((1,), self.dtype.np))
        if self.contiguous:
            row = numel(self.shape[1:]) * self.dtype.itemsize
            out = np.empty((stop - start, *self.shape[1:]), self.dtype.np)
            return self._pool.pread_into(self._path, self._start + start * row, out)
        return self._strided_rows(start, stop)

    def _strided_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows of a non-contiguous tensor (a saved transpose or slice): map the span they touch, copy out."""
        item = self.dtype.itemsize
        lo = start * self._stride[0]
        hi = lo + sum((n - 1) * s for n, s in zip((stop - start, *self.shape[1:]), self._stride, strict=True)) + 1
        if stop <= start or 0 in self.shape:
            return np.empty((max(0, stop - start), *self.shape[1:]), self.dtype.np)
        span = np.memmap(self._path, dtype=self.dtype.np, mode="r", offset=self._start + lo * item, shape=(hi - lo,))
        try:
            view = np.lib.stride_tricks.as_strided(
                span,
                shape=(stop - start, *self.shape[1:]),
                strides=tuple(s * item for s in self._stride),
                writeable=False,
            )
            return np.ascontiguousarray(view)
        finally:
            del span


def _data_start(pool: FilePool, path: str, base: int, info: zipfile.ZipInfo, what: str) -> int:
    """Absolute offset in `path` of a stored member's bytes (after its local header); the zip starts at `base`."""
    local = pool.pread(path, base + info.header_offset, 30)
    if local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{what}: member {info.filename!r}: corrupt local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return base + info.header_offset + 30 + name_len + extra_len


class _Walker:
    """Turns the unpickled object into named lazy tensors and inert values."""

    def __init__(
        self,
        path: str,
        what: str,
        base: int,
        prefix: str,
        members: dict[str, zipfile.ZipInfo],
        pool: FilePool,
        end: int,
    ):
        self.path, self.what, self.base, self.prefix, self.members = path, what, base, prefix, members
        self.pool, self.end = pool, end  # end: absolute offset just past the archive's bytes
        self.tensors: dict[str, ZipTensor] = {}
        self.values: dict[str, Any] = {}
        self._starts: dict[str, int] = {}

    def tensor(self, name: str, t: safe_pickle.RebuiltTensor) -> ZipTensor:
        where = f"{self.what}: tensor {name!r}"
        pid = t.storage
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{where}: unrecognised storage reference")
        _, storage_type, key, _location, storage_numel = pid
        try:
            dtype = from_torch_name(str(storage_type))
        except HubconvError as e:
            raise CheckpointError(f"{where}: {e}") from None
        shape, stride, offset = t.size, t.stride, t.storage_offset
        ints = (*shape, *stride, offset, storage_numel)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints) or len(stride) != len(shape):
            raise CheckpointError(f"{where}: malformed size/stride/offset {shape}/{stride}/{offset}")
        info = self.members.get(f"{self.prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{where}: storage {key!r} is missing from the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{where}: storage {key!r} is compressed (torch.save never compresses)")
        if info.file_size != storage_numel * dtype.itemsize:
            raise CheckpointError(
                f"{where}: storage {key!r} holds {info.file_size} bytes, expected {storage_numel} x {dtype.itemsize}"
            )
        span = 0 if 0 in shape else sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
        if offset + span > storage_numel:
            raise CheckpointError(f"{where}: elements {offset}..{offset + span} run past its storage ({storage_numel})")
        if key not in self._starts:
            start = _data_start(self.pool, self.path, self.base, info, self.what)
            if start + info.file_size > self.end:
                raise CheckpointError(f"{where}: storage {key!r} runs past the end of the file")
            self._starts[key] = start
        return ZipTensor(name, dtype, shape, stride, self.path, self._starts[key] + offset * dtype.itemsize, self.pool)

    def walk(self, obj: Any, name: str, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{self.what}: {name!r} nests containers more than {MAX_DEPTH} deep")
        if isinstance(obj, safe_pickle.RebuiltTensor):
            self.tensors[name] = self.tensor(name, obj)
        elif isinstance(obj, dict | list | tuple) and _holds_tensor(obj):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for k, v in items:
                self.walk(v, f"{name}.{k}" if name else str(k), depth + 1)
        else:
            self.values[name] = safe_pickle.plain(obj)


def _holds_tensor(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, safe_pickle.RebuiltTensor):
        return True
    if depth > MAX_DEPTH:
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_tensor(v, depth + 1) for v in obj)
    return False


def open_torch_zip(path: str, offset: int = 0, length: int | None = None, *, name: str | None = None) -> Checkpoint:
    """Index every tensor of a torch.save zip file; non-tensor subtrees become inert `values`.

    The archive may lie inside another file (a member of an uncompressed tar): `length` bytes at `offset`
    of `path`. Tensors are then segments of the outer file at absolute offsets; `name` (default `path`)
    names the archive in errors, e.g. `model.nemo: mp_rank_00/model_weights.ckpt`.
    """
    what = name or path
    pool = FilePool()
    try:
        size = os.path.getsize(path)
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise CheckpointError(f"{what}: {length} bytes at offset {offset} run past the end of {path} ({size})")
        source = Window(pool, path, offset, length) if (offset, length) != (0, size) else path
        with zipfile.ZipFile(source) as zf:
            infos = torch_zip.check_members(zf, what, max_members=torch_zip.MAX_FILE_MEMBERS)
            members = {i.filename: i for i in infos}
            pickles = [n for n in members if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{what}: not a torch.save archive (expected one <name>/data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            order = members.get(f"{prefix}byteorder")
            if order is not None and torch_zip.read_member(zf, order, 16, what).strip() != b"little":
                raise CheckpointError(f"{what}: big-endian torch files are not supported")
            raw = torch_zip.read_member(zf, members[pickles[0]], MAX_PICKLE, what)
        try:
            obj = safe_pickle.loads(raw, f"{what}: data.pkl", allow=safe_pickle.TORCH_FILE)
        except HubconvError:
            raise
        except pickle.UnpicklingError as e:
            message = str(e)
            if message.startswith(f"{what}: data.pkl: refusing"):  # a global outside the allow-list
                raise CheckpointError(message) from None
            raise CheckpointError(f"{what}: cannot read data.pkl ({message})") from None
        except RecursionError:
            raise CheckpointError(f"{what}: data.pkl nests too deeply") from None
        except Exception as e:
            raise CheckpointError(f"{what}: cannot read data.pkl ({type(e).__name__}: {e})") from None
        walker = _Walker(path, what, offset, prefix, members, pool, offset + length)
        walker.walk(obj, "")
    except HubconvError:
        pool.close()
        raise
    except torch_zip.ZIP_ERRORS as e:
        pool.close()
        raise CheckpointError(f"{what}: corrupt torch file ({type(e).__name__}: {e})") from None
    return Checkpoint(
        path=path,
        format="torch",
        tensors=dict(walker.tensors),
        entries=list(walker.values),
        values=walker.values,
        closers=[pool.close],
    )
