"""Composable lazy tensor views: every transform an adapter needs, read in bounded blocks.

A view is a `LazyTensor` (name, dtype, shape, `read_rows`, `segments`) built over other lazy
tensors, so views nest: a tensor-parallel merge, then a per-group QKV split, then a vocab trim
is three views, and a conversion target is simply a named view. Nothing is read until the
writer asks for rows, and then only about one block per level of nesting.

- Row views (`rows`: slices, concatenations and re-orderings of whole rows on dim 0) keep
  `segments()` whenever their sources have them, so the writer still copies their bytes inside
  the kernel (`copy_file_range`) without decoding them.
- `concat_columns` (row-parallel merges on dim 1), `transpose` (GPT-2 `Conv1D`), `zeros`
  (synthesized biases), `rope_permute` and `cast`/`elementwise` produce bytes block by block.
- A transpose reads column boxes of its source (`read_box`); for file-backed sources these are
  strided reads of a memory map, tiled so each block touches every source page once, instead of
  re-reading whole source rows for every output block.

Written by hand because no library offers lazy, file-segment-preserving tensor views without
loading tensors into memory (safetensors' `get_slice` reads boxes of one file, not views of views).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hubconv.dtypes import DType
from hubconv.dtypes import cast as cast_raw
from hubconv.errors import MappingError
from hubconv.io.tensor import BLOCK_BYTES, LazyTensor, Segment, numel, row_blocks, rows

_PAGE = mmap.PAGESIZE


def _row_bytes(t: LazyTensor) -> int:
    return numel(t.shape[1:]) * t.dtype.itemsize


class View:
    """Base class: name, dtype and shape fixed at construction; no file segments by default."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def segments(self) -> list[Segment] | None:
        return None

    def read_rows(self, start: int, stop: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows [r0, r1) and columns [c0, c1) of a 2-D view (subclasses read less when they can)."""
        return np.ascontiguousarray(self.read_rows(r0, r1)[:, c0:c1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.dtype}, {list(self.shape)})"


# ---------------------------------------------------------------------------------- row pieces


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of source number `source`."""

    source: int
    start: int
    stop: int


class Rows(View):
    """Whole rows of one or more sources (same dtype and trailing dims), concatenated on dim 0."""

    def __init__(self, name: str, sources: Sequence[LazyTensor], pieces: Sequence[Piece]):
        if not sources:
            raise MappingError(f"{name}: a row view needs at least one source")
        first = sources[0]
        for s in sources:
            if s.dtype is not first.dtype or tuple(s.shape[1:]) != tuple(first.shape[1:]) or not s.shape:
                raise MappingError(
                    f"{name}: cannot join rows of {s.name!r} {s.dtype} {list(s.shape)} with "
                    f"{first.name!r} {first.dtype} {list(first.shape)}"
                )
        for p in pieces:
            if not (0 <= p.source < len(sources)) or not (0 <= p.start <= p.stop <= sources[p.source].shape[0]):
                raise MappingError(f"{name}: row piece {p} is outside its source")
        self.name, self.dtype = name, first.dtype
        self.sources, self.pieces = tuple(sources), tuple(p for p in pieces if p.stop > p.start)
        self.shape = (sum(p.stop - p.start for p in self.pieces), *first.shape[1:])
        self._starts = np.cumsum([0] + [p.stop - p.start for p in self.pieces])

    def _walk(self, start: int, stop: int):
        """(piece, rows lo..hi within the piece's source) overlapping output rows [start, stop)."""
        i = max(0, int(np.searchsorted(self._starts, start, side="right")) - 1)
        while i < len(self.pieces) and self._starts[i] < stop:
            p, base = self.pieces[i], int(self._starts[i])
            lo, hi = max(start, base), min(stop, base + p.stop - p.start)
            if lo < hi:
                yield p, p.start + lo - base, p.start + hi - base
            i += 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        parts = [self.sources[p.source].read_rows(lo, hi) for p, lo, hi in self._walk(start, stop)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype.np)
        return np.concatenate(parts, axis=0)

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        parts = [read_box(self.sources[p.source], lo, hi, c0, c1) for p, lo, hi in self._walk(r0, r1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def segments(self) -> list[Segment] | None:
        row = _row_bytes(self)
        out: list[Segment] = []
        for p in self.pieces:
            segs = self.sources[p.source].segments()
            if segs is None:
                return None
            out.extend(_segment_range(segs, p.start * row, p.stop * row))
        return _merge_adjacent(out)


def _segment_range(segs: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """The byte range [lo, hi) of the concatenation of `segs`, as segments."""
    out, base = [], 0
    for s in segs:
        a, b = max(lo, base), min(hi, base + s.nbytes)
        if a < b:
            out.append(Segment(s.path, s.offset + a - base, b - a))
        base += s.nbytes
    return out


def _merge_adjacent(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if out and out[-1].path == s.path and out[-1].offset + out[-1].nbytes == s.offset:
            out[-1] = Segment(s.path, out[-1].offset, out[-1].nbytes + s.nbytes)
        else:
            out.append(s)
    return out


def slice_rows(src: LazyTensor, start: int, stop: int, name: str | None = None) -> Rows:
    """Rows [start, stop) of `src` (e.g. a padded vocabulary trimmed to the tokenizer's size)."""
    return Rows(name or src.name, [src], [Piece(0, start, stop)])


def concat_rows(sources: Sequence[LazyTensor], name: str) -> Rows:
    """Sources stacked on dim 0 (column-parallel tensor-parallel shards, [q; k; v] fusions)."""
    return Rows(name, sources, [Piece(i, 0, rows(s.shape)) for i, s in enumerate(sources)])


def split_rows(src: LazyTensor, sizes: Sequence[int], names: Sequence[str]) -> list[Rows]:
    """`src` cut on dim 0 into consecutive parts of `sizes` rows (e.g. Megatron `fc1` -> gate, up)."""
    if sum(sizes) != rows(src.shape) or len(sizes) != len(names):
        raise MappingError(f"{src.name}: {rows(src.shape)} rows cannot be split into parts of {list(sizes)} rows")
    bounds = np.cumsum([0, *sizes])
    return [slice_rows(src, int(a), int(b), n) for a, b, n in zip(bounds[:-1], bounds[1:], names, strict=True)]


def interleave_groups(sources: Sequence[LazyTensor], rows_per_group: Sequence[int], n_groups: int, name: str) -> Rows:
    """Per-group interleave: group g of the result is [rows of group g of sources[0]; of sources[1]; ...].

    Source i holds `n_groups * rows_per_group[i]` rows. This is the fused per-KV-group QKV layout
    (Megatron, MindSpore `w_qkv`): q, k, v -> [q_g0; k_g0; v_g0; q_g1; ...] with rows_per_group =
    (heads_per_group * head_dim, head_dim, head_dim). `split_groups` is its inverse.
    """
    for s, r in zip(sources, rows_per_group, strict=True):
        if rows(s.shape) != n_groups * r:
            raise MappingError(f"{name}: {s.name!r} has {rows(s.shape)} rows, expected {n_groups} groups of {r}")
    pieces = [Piece(i, g * r, (g + 1) * r) for g in range(n_groups) for i, r in enumerate(rows_per_group)]
    return Rows(name, sources, pieces)


def split_groups(src: LazyTensor, rows_per_group: Sequence[int], n_groups: int, names: Sequence[str]) -> list[Rows]:
    """Inverse of `interleave_groups`: one view per part, each gathering its rows from every group."""
    stride = sum(rows_per_group)
    if rows(src.shape) != n_groups * stride or len(names) != len(rows_per_group):
        raise MappingError(
            f"{src.name}: {rows(src.shape)} rows are not {n_groups} groups of {list(rows_per_group)} rows"
        )
    offsets = np.cumsum([0, *rows_per_group])
    return [
        Rows(
            n,
            [src],
            [Piece(0, g * stride + int(offsets[i]), g * stride + int(offsets[i + 1])) for g in range(n_groups)],
        )
        for i, n in enumerate(names)
    ]


def interleave_rows(sources: Sequence[LazyTensor], name: str) -> Rows:
    """Row by row alternation [a0; b0; a1; b1; ...] (MindSpore's `w_gate_hidden`); `split_groups`
    with rows_per_group of ones undoes it."""
    return interleave_groups(sources, [1] * len(sources), rows(sources[0].shape), name)


class EveryNthRow(View):
    """Rows `first`, `first + n`, `first + 2n`, ... of `src`: one part of a row-by-row interleave.

    Read in blocks of whole interleave periods (every part's rows, then every n-th kept), so it costs one
    block of memory, where `split_groups` with one-row groups holds a piece (and a file segment) per row."""

    def __init__(self, name: str, src: LazyTensor, first: int, n: int):
        if n <= 0 or not 0 <= first < n or not src.shape or src.shape[0] % n:
            raise MappingError(f"{src.name}: {rows(src.shape)} rows cannot be split row by row into {n} parts")
        self.name, self.dtype, self.src, self.first, self.n = name, src.dtype, src, first, n
        self.shape = (src.shape[0] // n, *src.shape[1:])

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.src.read_rows(self.n * start, self.n * stop)[self.first :: self.n])


def split_interleaved_rows(src: LazyTensor, names: Sequence[str]) -> list[View]:
    """Inverse of `interleave_rows`: [a0; b0; a1; b1; ...] -> a, b (MindSpore's `w_gate_hidden` -> gate, up)."""
    return [EveryNthRow(n, src, i, len(names)) for i, n in enumerate(names)]


# ------------------------------------------------------------------------------ column concat


class ConcatColumns(View):
    """Sources joined on dim 1 (row-parallel tensor-parallel shards: attention dense, fc2)."""

    def __init__(self, name: str, sources: Sequence[LazyTensor]):
        first = sources[0]
        for s in sources:
            if (
                len(s.shape) < 2
                or s.dtype is not first.dtype
                or s.shape[0] != first.shape[0]
                or (tuple(s.shape[2:]) != tuple(first.shape[2:]))
            ):
                raise MappingError(f"{name}: cannot join columns of {s.name!r} {list(s.shape)} and {first.name!r}")
        self.name, self.dtype, self.sources = name, first.dtype, tuple(sources)
        self.shape = (first.shape[0], sum(s.shape[1] for s in sources), *first.shape[2:])
        self._bounds = np.cumsum([0] + [s.shape[1] for s in sources])

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([s.read_rows(start, stop) for s in self.sources], axis=1)

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        parts = []
        for s, a, b in zip(self.sources, self._bounds[:-1], self._bounds[1:], strict=True):
            lo, hi = max(c0, int(a)), min(c1, int(b))
            if lo < hi:
                parts.append(read_box(s, r0, r1, lo - int(a), hi - int(a)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def concat_columns(sources: Sequence[LazyTensor], name: str) -> ConcatColumns:
    return ConcatColumns(name, sources)


def split_columns(src: LazyTensor, sizes: Sequence[int], names: Sequence[str]) -> list[View]:
    """`src` cut on dim 1 (the inverse of `concat_columns`, used to re-shard for import)."""
    if len(src.shape) != 2 or sum(sizes) != src.shape[1]:
        raise MappingError(f"{src.name}: {list(src.shape)} cannot be split into columns of {list(sizes)}")
    bounds = np.cumsum([0, *sizes])
    return [ColumnSlice(n, src, int(a), int(b)) for a, b, n in zip(bounds[:-1], bounds[1:], names, strict=True)]


class ColumnSlice(View):
    """Columns [c0, c1) of a 2-D source."""

    def __init__(self, name: str, src: LazyTensor, c0: int, c1: int):
        self.name, self.dtype, self.src, self.c0, self.c1 = name, src.dtype, src, c0, c1
        self.shape = (src.shape[0], c1 - c0)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return read_box(self.src, start, stop, self.c0, self.c1)

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return read_box(self.src, r0, r1, self.c0 + c0, self.c0 + c1)


# ---------------------------------------------------------------------------------- transpose


def read_box(t: LazyTensor, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows [r0, r1), columns [c0, c1) of a 2-D lazy tensor, reading as little as the source allows."""
    box = getattr(t, "read_box", None)
    if box is not None:
        return box(r0, r1, c0, c1)
    segs = t.segments()
    if segs is not None:
        return _mapped_box(segs, t.dtype, t.shape, r0, r1, c0, c1)
    return np.ascontiguousarray(t.read_rows(r0, r1)[:, c0:c1])


def _mapped_box(
    segs: Sequence[Segment], dtype: DType, shape: tuple[int, ...], r0: int, r1: int, c0: int, c1: int
) -> np.ndarray:
    """A box of a file-backed 2-D tensor: strided copies out of a read-only map of the rows needed.

    Only the pages holding rows [r0, r1) are mapped, and only for the duration of the copy.
    """
    cols = shape[1]
    row = cols * dtype.itemsize
    out = np.empty((r1 - r0, c1 - c0), dtype.np)
    done = 0
    base = 0  # first row of the current segment
    for s in segs:
        n = s.nbytes // row
        lo, hi = max(r0, base), min(r1, base + n)
        if lo < hi:
            start = s.offset + (lo - base) * row
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            length = start - aligned + (hi - lo) * row
            fd = os.open(s.path, os.O_RDONLY)
            try:
                with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=aligned) as m:
                    a = np.frombuffer(m, dtype.np, count=(hi - lo) * cols, offset=start - aligned)
                    out[done : done + hi - lo] = a.reshape(hi - lo, cols)[:, c0:c1]
                    del a
            finally:
                os.close(fd)
            done += hi - lo
        base += n
    return out


class Transpose(View):
    """The transpose of a 2-D source (GPT-2 `Conv1D` weights are stored [in, out])."""

    def __init__(self, name: str, src: LazyTensor):
        if len(src.shape) != 2:
            raise MappingError(f"{src.name}: only 2-D tensors can be transposed (shape {list(src.shape)})")
        self.name, self.dtype, self.src = name, src.dtype, src
        self.shape = (src.shape[1], src.shape[0])

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(read_box(self.src, 0, self.src.shape[0], start, stop).T)

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return np.ascontiguousarray(read_box(self.src, c0, c1, r0, r1).T)

    def block_rows(self) -> int:
        """Output rows per block: about BLOCK_BYTES, but wide enough that each source row
        contributes at least a page, so a file-backed source is read about once in total."""
        per_row = max(1, self.shape[1] * self.dtype.itemsize)
        return max(1, BLOCK_BYTES // per_row, math.ceil(_PAGE / self.dtype.itemsize))


def transpose(src: LazyTensor, name: str | None = None) -> Transpose:
    return Transpose(name or src.name, src)


# ------------------------------------------------------------------------ synthesized, RoPE, casts


class Zeros(View):
    """A tensor of zeros (a bias the source model does not have). Lossy: nothing to invert to."""

    def __init__(self, name: str, dtype: DType, shape: tuple[int, ...]):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.zeros((stop - start, *self.shape[1:]), self.dtype.np)


class RopePermute(View):
    """Rows of a Q or K projection moved between interleaved and rotate-half RoPE layouts.

    Within each of `n_heads` heads, interleaved rows (x0, y0, x1, y1, ...) become
    (x0, x1, ..., y0, y1, ...) when `to_half` is true, and back otherwise. K uses the number of
    KV heads, not of query heads: mixing them up is the classic GQA conversion bug.
    """

    def __init__(self, name: str, src: LazyTensor, n_heads: int, *, to_half: bool = True):
        if not src.shape or n_heads <= 0 or src.shape[0] % n_heads or (src.shape[0] // n_heads) % 2:
            raise MappingError(
                f"tensor {src.name!r} with shape {list(src.shape)} cannot be split into {n_heads} heads of even size"
            )
        self.name, self.dtype, self.shape, self.src = name, src.dtype, tuple(src.shape), src
        self.n_heads, self.to_half = n_heads, to_half
        self.head_rows = src.shape[0] // n_heads

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        h0, h1 = start // self.head_rows, -(-stop // self.head_rows)
        raw = self.src.read_rows(h0 * self.head_rows, h1 * self.head_rows)
        half, rest = self.head_rows // 2, self.shape[1:]
        split = (h1 - h0, half, 2, *rest) if self.to_half else (h1 - h0, 2, half, *rest)
        out = np.swapaxes(raw.reshape(split), 1, 2).reshape(-1, *rest)
        return np.ascontiguousarray(out[start - h0 * self.head_rows : stop - h0 * self.head_rows])


def rope_permute(src: LazyTensor, n_heads: int, *, to_half: bool = True, name: str | None = None) -> RopePermute:
    return RopePermute(name or src.name, src, n_heads, to_half=to_half)


class Elementwise(View):
    """`fn` applied to each block of raw storage, producing `dtype` (casts, scaling)."""

    def __init__(self, name: str, src: LazyTensor, dtype: DType, fn: Callable[[np.ndarray], np.ndarray]):
        self.name, self.dtype, self.shape, self.src, self.fn = name, dtype, tuple(src.shape), src, fn

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        out = self.fn(self.src.read_rows(start, stop))
        if out.dtype != self.dtype.np or out.shape[1:] != self.shape[1:]:
            raise MappingError(f"{self.name}: elementwise map returned {out.dtype} {list(out.shape)}")
        return out

    def read_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self.fn(read_box(self.src, r0, r1, c0, c1))


def rename(src: LazyTensor, name: str) -> View:
    """`src` unchanged under another name (its file segments kept)."""
    return Rows(name, [src], [Piece(0, 0, rows(src.shape))]) if src.shape else _Same(src, name)


def cast(src: LazyTensor, dtype: DType, name: str | None = None) -> View:
    """`src` converted to `dtype` (round-to-nearest-even; float16 overflow is an error)."""
    if dtype is src.dtype:
        return rename(src, name or src.name)
    what = name or src.name
    return Elementwise(what, src, dtype, lambda raw: cast_raw(raw, src.dtype, dtype, what=what))


class _Same(View):
    """A 0-d tensor under another name."""

    def __init__(self, src: LazyTensor, name: str | None):
        self.name, self.dtype, self.shape, self.src = name or src.name, src.dtype, tuple(src.shape), src

    def segments(self) -> list[Segment] | None:
        return self.src.segments()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.src.read_rows(start, stop)


def blocks(t: LazyTensor):
    """The view's row-major data in bounded blocks (what the writer consumes)."""
    step = t.block_rows() if isinstance(t, Transpose) else None
    if step is None:
        yield from (t.read_rows(lo, hi) for lo, hi in row_blocks(t.shape, t.dtype.itemsize))
        return
    for lo in range(0, rows(t.shape), step):
        yield t.read_rows(lo, min(rows(t.shape), lo + step))


def materialize(t: LazyTensor) -> np.ndarray:
    """The whole view in memory (tests and round trips only)."""
    parts = [b.reshape(-1) for b in blocks(t)]
    return np.concatenate(parts).reshape(t.shape) if parts else np.empty(t.shape, t.dtype.np)
