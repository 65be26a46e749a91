"""Streaming torch.distributed.checkpoint (DCP) writer: a model-only checkpoint as torch's FileSystemWriter lays it out.

One `__0_0.distcp` file holds every tensor as one item (a small `torch.save` archive of the whole tensor, written
in place by `hubconv.io.torch_zip_writer`, so nothing is held in memory but one block); `.metadata` is the
pickled `Metadata` built from torch's own classes (`TensorStorageMetadata` per FQN, one chunk each,
`MetadataIndex` -> `_StorageInfo(relative_path, offset, length)`, planner data `{fqn: (fqn,)}`, version
"1.0.0"), so `torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder)` fills a model's state dict
directly, as TorchTitan's `initial_load_path` does.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable, Sequence

from hubconv.errors import OutputError
from hubconv.io.tensor import LazyTensor
from hubconv.io.torch_zip_writer import TensorRef, TorchZip
from hubconv.io.writer import _Copier

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION


def _metadata(items: Sequence[tuple[TensorRef, int, int]], save_id: str) -> bytes:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for ref, offset, length in items:
        name, shape = ref.tensor.name, torch.Size(ref.tensor.shape)
        zeros = torch.Size([0] * len(shape))
        state[name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=getattr(torch, ref.out_dtype.torch_name)),
            size=shape,
            chunks=[ChunkStorageMetadata(offsets=zeros, sizes=shape)],
        )
        storage[MetadataIndex(fqn=name, offset=zeros, index=0)] = _StorageInfo(DATA_FILE, offset, length)
    md = Metadata(
        state_dict_metadata=state,
        planner_data={name: (name,) for name in state},
        storage_data=storage,
        storage_meta=StorageMeta(save_id=save_id),
        version=DCP_VERSION,
    )
    return pickle.dumps(md)


def write_dcp(
    folder: str,
    tensors: Sequence[LazyTensor | TensorRef],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write `tensors` (in order; names are the FQNs) as a DCP checkpoint into the existing `folder`.
    Returns the bytes written."""
    refs = [t if isinstance(t, TensorRef) else TensorRef(t) for t in tensors]
    seen: set[str] = set()
    for ref in refs:
        if ref.tensor.name in seen:
            raise OutputError(f"{folder}: tensor {ref.tensor.name!r} would be written twice")
        seen.add(ref.tensor.name)
    plans, items, offset = [], [], 0
    for ref in refs:
        plan = TorchZip(ref, "archive")  # the item's pickle root is the tensor itself, as torch.save(tensor)
        plans.append((plan, offset))
        items.append((ref, offset, plan.size))
        offset += plan.size
    copier = _Copier()
    path = os.path.join(folder, DATA_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for plan, base in plans:
            plan.write(fd, base, copier, progress)
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)
        copier.close()
    save_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "hubconv:" + ",".join(f"{r.tensor.name}" for r in refs)))
    meta = _metadata(items, save_id)
    with open(os.path.join(folder, METADATA_FILE), "wb") as f:
        f.write(meta)
    return offset + len(meta)
