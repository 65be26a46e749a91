"""What every native reference forward shares: weights read from lazy tensors as float32 torch tensors, and
matrix products that stream the weight in row blocks, so memory holds activations plus one block whatever
the model size."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hubconv.dtypes import to_float32
from hubconv.io.tensor import LazyTensor, read_all, row_blocks

BLOCK_BYTES = 64 << 20  # float32 weight blocks big enough for efficient matmuls


def f32(raw: np.ndarray, t: LazyTensor) -> torch.Tensor:
    """Raw rows of `t` as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(to_float32(raw, t.dtype), dtype=np.float32))


def load_tensor(t: LazyTensor) -> torch.Tensor:
    """The whole of `t` in float32 (norms, biases: small tensors)."""
    return f32(read_all(t), t).reshape(t.shape)


def load(tensors: Mapping[str, LazyTensor], key: str) -> torch.Tensor | None:
    """`tensors[key]` in float32, or None when the checkpoint has no such tensor (an optional bias)."""
    t = tensors.get(key)
    return None if t is None else load_tensor(t)


def linear(x: torch.Tensor, w: LazyTensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ b) with W [out, in] read in row blocks of output features."""
    blocks = row_blocks(w.shape, 4, block=BLOCK_BYTES)
    outs = [x @ f32(w.read_rows(lo, hi), w).reshape(hi - lo, -1).T for lo, hi in blocks]
    y = torch.cat(outs, dim=-1)
    return y if b is None else y + b


def rows(t: LazyTensor, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of `t` (an embedding lookup), each distinct row read once."""
    cache = {i: f32(t.read_rows(i, i + 1), t).reshape(-1) for i in set(ids)}
    return torch.stack([cache[i] for i in ids])
