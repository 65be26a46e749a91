"""The reader interface every checkpoint format implements, and format detection.

Readers treat the checkpoint as hostile input: every file a reader opens because the checkpoint's
own metadata or listing names it goes through `hubconv.io.paths.confined` (it must resolve inside
the folder the user named), and every size, offset and shape is validated before bytes are read,
with a one-line CheckpointError naming the file and tensor otherwise. New readers (Megatron rank
folders, tar members) follow the same rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hubconv.errors import CheckpointError
from hubconv.io.tensor import LazyTensor


@dataclass
class Checkpoint:
    """An opened checkpoint: lazy tensors plus the non-tensor entries beside them.

    `tensors` is in the source's own order. `entries` names non-tensor records (DCP byte items,
    Python values in a torch file) so adapters can account for them; `values` holds small
    non-tensor values a reader could decode safely (for example nanoGPT's `model_args`).
    """

    path: str
    format: str
    tensors: dict[str, LazyTensor]
    entries: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str) -> Checkpoint:
    """Open a DCP folder, a safetensors file or folder, or a torch file, lazily."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        names = os.listdir(path)
        if ".metadata" in names or any(n.endswith(".distcp") for n in names):
            from hubconv.io.dcp import open_dcp

            return open_dcp(path)
        if "model.safetensors.index.json" in names or any(n.endswith(".safetensors") for n in names):
            from hubconv.io.safetensors_reader import open_safetensors

            return open_safetensors(path)
        raise CheckpointError(
            f"{path}: not a recognised checkpoint folder (expected a DCP `.metadata` + `*.distcp`, "
            "or `*.safetensors` files)"
        )
    if path.endswith(".safetensors"):
        from hubconv.io.safetensors_reader import open_safetensors

        return open_safetensors(path)
    import zipfile

    if zipfile.is_zipfile(path):  # torch.save since 1.6: read without torch, tensors as file segments
        from hubconv.io.torch_file import open_torch_zip

        return open_torch_zip(path)
    from hubconv.io.torch_reader import open_torch_file  # legacy (pre-zip) format: torch.load(weights_only=True)

    return open_torch_file(path)
