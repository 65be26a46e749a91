"""Target tensors: how each output tensor is produced from lazy source tensors, block by block.

A target either forwards its source's file segments (no transform: the writer copies the bytes
inside the kernel) or yields its row-major data in bounded blocks of raw storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hubconv.dtypes import DType
from hubconv.errors import MappingError
from hubconv.io.tensor import BLOCK_BYTES, LazyTensor, Segment, row_blocks


@dataclass
class Target:
    """An output tensor named `name`, produced from `sources`; `dtype` is the source's."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    sources: tuple[LazyTensor, ...]

    def segments(self) -> list[Segment] | None:
        return None

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError


@dataclass
class Copy(Target):
    """The source tensor unchanged."""

    def segments(self) -> list[Segment] | None:
        return self.sources[0].segments()

    def blocks(self) -> Iterator[np.ndarray]:
        src = self.sources[0]
        for lo, hi in row_blocks(src.shape, src.dtype.itemsize):
            yield src.read_rows(lo, hi)


def copy(src: LazyTensor, name: str) -> Target:
    return Copy(name, src.shape, src.dtype, (src,))


@dataclass
class RopePermute(Target):
    """Rows of a Q or K projection reordered between interleaved and rotate-half RoPE layouts.

    Within each of `n_heads` heads, interleaved rows (x0, y0, x1, y1, ...) become
    (x0, x1, ..., y0, y1, ...) when `to_half` is true, and back otherwise. K must use the number
    of KV heads, not of query heads: mixing them up is the classic GQA conversion bug.
    """

    n_heads: int = 0
    to_half: bool = True

    def blocks(self) -> Iterator[np.ndarray]:
        src = self.sources[0]
        d1, d2 = src.shape
        head_rows = d1 // self.n_heads
        head_bytes = head_rows * d2 * src.dtype.itemsize
        group = max(1, BLOCK_BYTES // max(1, head_bytes))
        for h0 in range(0, self.n_heads, group):
            h1 = min(self.n_heads, h0 + group)
            raw = src.read_rows(h0 * head_rows, h1 * head_rows)
            if self.to_half:
                view = raw.reshape(h1 - h0, head_rows // 2, 2, d2)
            else:
                view = raw.reshape(h1 - h0, 2, head_rows // 2, d2)
            yield np.ascontiguousarray(view.transpose(0, 2, 1, 3)).reshape(-1, d2)


def rope_permute(src: LazyTensor, name: str, n_heads: int, *, to_half: bool = True) -> Target:
    if len(src.shape) != 2 or n_heads <= 0 or src.shape[0] % n_heads or (src.shape[0] // n_heads) % 2:
        raise MappingError(
            f"tensor {src.name!r} with shape {list(src.shape)} cannot be split into {n_heads} heads of even size"
        )
    return RopePermute(name, src.shape, src.dtype, (src,), n_heads=n_heads, to_half=to_half)


def materialize(t: Target) -> np.ndarray:
    """The whole target tensor in memory (round trips and tests)."""
    parts = [b.reshape(-1) for b in t.blocks()]
    return np.concatenate(parts).reshape(t.shape) if parts else np.empty(t.shape, t.dtype.np)
