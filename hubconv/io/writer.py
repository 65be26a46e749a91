"""Streaming, sharded safetensors writer.

Written by hand because `safetensors.torch.save_file` and huggingface_hub's
`save_torch_state_dict` need every tensor of a shard in memory at once. Here the shard plan
(which tensor goes to which file at which byte offset) is computed up front from metadata
alone, deterministically; then each tensor is either copied from its source file inside the
kernel (`os.copy_file_range`, when it needs no transform) or written block by block.
Memory stays at about one block whatever the model size.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from hubconv.dtypes import DType, cast
from hubconv.errors import OutputError
from hubconv.io.tensor import LazyTensor, numel
from hubconv.views import blocks as view_blocks

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # offset in the shard's data section
    end: int


@dataclass
class Shard:
    filename: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    def header(self, metadata: dict[str, str]) -> bytes:
        """The safetensors header, space-padded to a multiple of 8 bytes (as the Rust writer does)."""
        h: dict[str, object] = {"__metadata__": metadata}
        for t in self.tensors:
            h[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
        raw = json.dumps(h, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


@dataclass
class ShardPlan:
    shards: list[Shard]
    metadata: dict[str, str]

    @property
    def total_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def file_sizes(self) -> dict[str, int]:
        return {s.filename: len(s.header(self.metadata)) + s.data_bytes for s in self.shards}

    def index(self) -> dict[str, object] | None:
        if len(self.shards) == 1:
            return None
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}


_SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
_SIZE = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:E[+-]?\d+)?)\s*(GIB|MIB|KIB|GB|MB|KB|B)?")


def parse_size(value: str | int, option: str = "--max-shard-size") -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (GB = 10**9, like transformers); a positive,
    finite size or an OutputError naming `option`."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.fullmatch(str(value).strip().upper())
        number = float(m[1]) * _SIZE_UNITS[m[2] or "B"] if m else math.nan
        if not math.isfinite(number):
            raise OutputError(f"{option}: invalid size {value!r} (use e.g. 5GB, 500MB or a byte count)")
        size = int(number)
    if size <= 0:
        raise OutputError(f"{option}: size must be positive, got {value!r}")
    return size


def plan_shards(
    tensors: list[tuple[str, DType, tuple[int, ...]]], max_shard_bytes: int, metadata: dict[str, str] | None = None
) -> ShardPlan:
    """Greedy, order-preserving packing into shards of at most `max_shard_bytes` of data
    (a tensor bigger than the limit gets a shard of its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    offset = 0
    for name, dtype, shape in tensors:
        size = numel(shape) * dtype.itemsize
        if groups[-1] and offset + size > max_shard_bytes:
            groups.append([])
            offset = 0
        groups[-1].append(PlannedTensor(name, dtype, tuple(shape), offset, offset + size))
        offset += size
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return ShardPlan([Shard(f, g) for f, g in zip(names, groups, strict=True)], metadata or {"format": "pt"})


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


_COPY_BUFFER = 1024 * 1024  # fallback copies: small enough to stay in the CPU cache


class _Copier:
    """Moves file ranges into the output with `copy_file_range` (inside the kernel, one memory
    pass: ~4x faster here than read + write through a large buffer), falling back to a small
    buffered copy where the filesystem cannot do it."""

    def __init__(self) -> None:
        self.kernel_copy = hasattr(os, "copy_file_range")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(_COPY_BUFFER))
        return buf

    def _src(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def copy(self, path: str, src_off: int, dst: int, dst_off: int, n: int) -> None:
        src = self._src(path)
        while n > 0:
            if self.kernel_copy:
                try:
                    done = os.copy_file_range(src, dst, min(n, 1 << 30), src_off, dst_off)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.kernel_copy = False
                    continue
                if done == 0:
                    raise OutputError(f"{path}: ended early while copying tensor data")
            else:
                buf = self._buffer()[: min(n, _COPY_BUFFER)]
                done = os.preadv(src, [buf], src_off)
                if not done:
                    raise OutputError(f"{path}: ended early while copying tensor data")
                _write_all(dst, buf[:done], dst_off)
            src_off, dst_off, n = src_off + done, dst_off + done, n - done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _write_tensor(
    fd: int, base: int, planned: PlannedTensor, t: LazyTensor, copier: _Copier, progress: Callable[[int], None]
) -> None:
    """Write one tensor at its planned offset (`base` = where the shard's data section starts)."""
    pos = base + planned.begin
    segments = t.segments() if t.dtype is planned.dtype else None
    if segments is not None:
        for seg in segments:
            copier.copy(seg.path, seg.offset, fd, pos, seg.nbytes)
            pos += seg.nbytes
            progress(seg.nbytes)
    else:
        for block in view_blocks(t):
            out = cast(block, t.dtype, planned.dtype, what=f"tensor {planned.name!r}")
            data = memoryview(np.ascontiguousarray(out)).cast("B")
            _write_all(fd, data, pos)
            pos += len(data)
            progress(len(data))
    if pos != base + planned.end:
        raise OutputError(
            f"tensor {planned.name!r}: produced {pos - base - planned.begin} bytes, "
            f"planned {planned.end - planned.begin}"
        )


def default_threads() -> int:
    return max(1, min(4, int(os.environ.get("HUBCONV_WRITE_THREADS", os.cpu_count() or 1))))


class ShardSink(Protocol):
    """Receives finished shards (streaming upload); `reserve` may block to bound disk use."""

    def reserve(self) -> None: ...

    def done(self, path: str) -> None: ...

    def flush(self) -> None:
        """Return once every shard handed to `done` has been consumed (or raise why not).

        A sink may also define `skip(path) -> bool`: a shard it skips is not written here at all (another worker
        of a sharded release writes it; see `hubconv.workers`)."""


@dataclass
class _OpenShard:
    path: str
    header: bytes
    remaining: int
    fd: int | None = None
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_model(
    plan: ShardPlan,
    targets: dict[str, LazyTensor],
    out_dir: str,
    *,
    show_progress: bool = True,
    threads: int | None = None,
    sink: ShardSink | None = None,
) -> None:
    """Write every shard (and the index when sharded) into `out_dir`, which must exist.

    Offsets are fixed by the plan, so tensors are independent jobs: a few threads move them at
    once (kernel copies and numpy release the GIL), in plan order. A shard file is created when
    its first tensor starts and handed to `sink` as soon as its last tensor is written."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    copier = _Copier()
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="writing", disable=not show_progress or None)
    bar_lock = threading.Lock()

    def progress(n: int) -> None:
        with bar_lock:
            bar.update(n)

    shards = [
        _OpenShard(os.path.join(out_dir, s.filename), s.header(plan.metadata), len(s.tensors)) for s in plan.shards
    ]

    def job(state: _OpenShard, planned: PlannedTensor) -> None:
        with state.lock:
            if state.fd is None:
                if sink is not None:
                    sink.reserve()
                state.fd = os.open(state.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                _write_all(state.fd, memoryview(state.header), 0)
        _write_tensor(state.fd, len(state.header), planned, targets[planned.name], copier, progress)
        with state.lock:
            state.remaining -= 1
            if state.remaining == 0:
                os.close(state.fd)
                state.finished = True
                if sink is not None:
                    sink.done(state.path)

    skip = getattr(sink, "skip", None)
    try:
        with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
            futures = [
                pool.submit(job, state, planned)
                for state, shard in zip(shards, plan.shards, strict=True)
                if skip is None or not skip(state.path)
                for planned in shard.tensors
            ]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()  # do not write the rest of a model that is failing
                raise
        if sink is not None:
            sink.flush()  # shards leave this folder before anyone renames it
        index = plan.index()
        if index is not None:
            with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
    finally:
        for state in shards:
            if state.fd is not None and not state.finished:
                os.close(state.fd)
        bar.close()
        copier.close()
