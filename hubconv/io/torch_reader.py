"""Lazy reader for plain torch files (`torch.save` output): `weights_only=True`, `mmap=True`."""

from __future__ import annotations

from typing import Any

import numpy as np

from hubconv.dtypes import from_torch_name
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import Segment


class TorchTensor:
    """A tensor backed by the mmap'd torch file; rows are copied out block by block."""

    def __init__(self, name: str, tensor: Any):
        self.name = name
        self._t = tensor
        self.dtype = from_torch_name(str(tensor.dtype))
        self.shape = tuple(tensor.shape)

    def segments(self) -> list[Segment] | None:
        return None

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        import torch

        t = self._t.reshape(1) if self._t.dim() == 0 else self._t[start:stop]
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16).copy()
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t.view(torch.uint8).numpy().copy()
        return t.numpy().copy()


def _flatten(obj: Any, prefix: str, tensors: dict[str, TorchTensor], values: dict[str, Any]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = TorchTensor(prefix, obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, values)
    else:
        values[prefix] = obj


def open_torch_file(path: str) -> Checkpoint:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {e}") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read torch file ({e})") from None
    tensors: dict[str, TorchTensor] = {}
    values: dict[str, Any] = {}
    _flatten(obj, "", tensors, values)
    return Checkpoint(path=path, format="torch", tensors=dict(tensors), entries=list(values), values=values)
