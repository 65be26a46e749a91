"""Lazy reader for plain torch files (`torch.save` output): `weights_only=True`, `mmap=True`.

Before torch sees the file, its zip central directory is checked (`torch_zip.check_members`): a
bounded member count and no compressed member above a small size, so a deflate bomb is refused
without being inflated. Whatever torch raises on a corrupt file becomes a one-line CheckpointError.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from hubconv.dtypes import from_torch_name
from hubconv.errors import CheckpointError, HubconvError
from hubconv.io import torch_zip
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import Segment

_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    *torch_zip.ZIP_ERRORS,
    RuntimeError,
    pickle.UnpicklingError,
    struct.error,
    TypeError,
    AttributeError,
)


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


def one_line(e: BaseException, limit: int = 300) -> str:
    """The informative line of an exception message (torch's weights_only refusals span many paragraphs
    of advice around one line that names the refused global)."""
    lines = [ln.strip() for ln in (str(e) or type(e).__name__).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "(1)", "(2)", "Please file"))]
        lines = detail[:1] or lines
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _precheck(path: str) -> None:
    """Refuse a zip-format torch file whose members are too many or compressed beyond the bound."""
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy format: torch.load(mmap=True) refuses it with its own message
        with zipfile.ZipFile(path) as zf:
            torch_zip.check_members(zf, path, max_members=torch_zip.MAX_FILE_MEMBERS)
    except HubconvError:
        raise
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt torch file ({type(e).__name__}: {one_line(e)})") from None


def open_torch_file(path: str) -> Checkpoint:
    import torch

    _precheck(path)
    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:  # the legacy format cannot be memory-mapped; a file object also keeps torch from going by the name
            with open(path, "rb") as f:
                head = f.read(2)
                if len(head) < 2 or head[0] != 0x80:
                    raise CheckpointError(
                        f"{path}: cannot read torch file (neither a torch.save zip archive nor a pickle: "
                        f"starts with {head.hex() or 'nothing'})"
                    )
                f.seek(0)
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {one_line(e)}") from None
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read torch file ({type(e).__name__}: {one_line(e)})") from None
    tensors: dict[str, TorchTensor] = {}
    values: dict[str, Any] = {}
    try:
        _flatten(obj, "", tensors, values)
    except HubconvError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: torch file nests dictionaries too deeply") from None
    return Checkpoint(path=path, format="torch", tensors=dict(tensors), entries=list(values), values=values)
