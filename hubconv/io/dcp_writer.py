"""Streaming torch.distributed.checkpoint (DCP) writer: a model-only checkpoint as torch's FileSystemWriter lays it out.

One `__0_0.distcp` file holds every tensor as one item (a small `torch.save` archive of the whole tensor, written
in place by `hubconv.io.torch_zip_writer`, so nothing is held in memory but one block); `.metadata` is the
pickled `Metadata`, generated without importing torch (which would cost seconds of start-up) but naming torch's
own classes with the state their pickles carry (`TensorStorageMetadata` per FQN, one chunk each, `MetadataIndex`
-> `_StorageInfo(relative_path, offset, length)`, planner data `{fqn: (fqn,)}`, version "1.0.0"), so
`torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder)` fills a model's state dict directly, as
TorchTitan's `initial_load_path` does.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from hubconv.errors import OutputError
from hubconv.io.tensor import LazyTensor
from hubconv.io.torch_zip_writer import (
    Global,
    Items,
    NewObject,
    Reduce,
    TensorRef,
    TorchZip,
    pickle_object,
    torch_dtype,
)
from hubconv.io.writer import _Copier

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION


_MD = "torch.distributed.checkpoint.metadata"


def _size(dims: Sequence[int]) -> Reduce:
    return Reduce(Global("torch", "Size"), (tuple(dims),))


def _obj(name: str, state: Any, module: str = _MD) -> NewObject:
    return NewObject(Global(module, name), state)


def _metadata(items: Sequence[tuple[TensorRef, int, int]], save_id: str) -> bytes:
    """The pickled `Metadata`, generated without torch: the same classes and state torch's own pickle has
    (dataclass `__dict__`s; `TensorProperties.__getstate__`'s tuple; `_StorageInfo` without None fields)."""
    layout = Reduce(Global("torch.serialization", "_get_layout"), ("torch.strided",))
    contiguous = Reduce(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,))
    state: dict[str, NewObject] = {}
    storage: list[tuple[NewObject, NewObject]] = []
    for ref, offset, length in items:
        name, dims = ref.tensor.name, tuple(ref.tensor.shape)
        zeros = _size([0] * len(dims))
        props = _obj("TensorProperties", (torch_dtype(ref.out_dtype.torch_name), layout, False, contiguous, False))
        chunk = _obj("ChunkStorageMetadata", {"offsets": zeros, "sizes": _size(dims)})
        state[name] = _obj("TensorStorageMetadata", {"properties": props, "size": _size(dims), "chunks": [chunk]})
        index = _obj("MetadataIndex", {"fqn": name, "offset": zeros, "index": 0})
        info = {"relative_path": DATA_FILE, "offset": offset, "length": length}
        storage.append((index, _obj("_StorageInfo", info, "torch.distributed.checkpoint.filesystem")))
    meta = _obj("StorageMeta", {"checkpoint_id": None, "save_id": save_id, "load_id": None, "modules": []})
    md = {
        "state_dict_metadata": state,
        "planner_data": {name: (name,) for name in state},
        "storage_data": Items(storage),
        "storage_meta": meta,
        "version": DCP_VERSION,
    }
    return pickle_object(_obj("Metadata", md))[0]


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
