"""Allow-list unpickling of DCP `.metadata` and torch.save `data.pkl` records without importing torch.

torch's own DCP reader calls plain `pickle.load` on `.metadata`, which runs arbitrary code from a
downloaded checkpoint. Here every global is looked up in an allow-list of inert stand-in classes;
anything else is refused. The stand-ins keep only what a reader needs (dtype names, sizes,
offsets, file ranges), and skipping torch keeps `hubconv convert` start-up fast.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any


class _Record:
    """Generic stand-in: accepts constructor args, dataclass state or `__setstate__` dicts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class Metadata(_Record):
    state_dict_metadata: dict[str, Any]
    storage_data: dict[Any, Any]


class TensorStorageMetadata(_Record):
    pass


class BytesStorageMetadata(_Record):
    pass


class ChunkStorageMetadata(_Record):
    pass


class TensorProperties(_Record):
    pass


class StorageMeta(_Record):
    pass


class StorageInfo(_Record):
    relative_path: str
    offset: int
    length: int


class MetadataIndex(_Record):
    fqn: str

    def __hash__(self) -> int:
        return hash((self.fqn, tuple(getattr(self, "offset", None) or ())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and (self.fqn, getattr(self, "offset", None)) == (
            other.fqn,
            getattr(other, "offset", None),
        )


class TorchDtype(str):
    """A torch dtype, kept as its name (`bfloat16`)."""


class StorageType(str):
    """A typed storage class such as `BFloat16Storage`, kept as its name."""


class _Enum(_Record):
    pass


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(args[0]) if args else ()


def _path(*parts: str) -> str:
    return "/".join(parts)


def _ignore(*args: Any) -> None:
    return None


class RebuiltTensor(_Record):
    """What `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` describes."""

    def __init__(self, storage: Any, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...], *rest: Any):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)


_DTYPES = {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "float8_e5m2",
    "complex64",
}
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
}
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_META, "Metadata"): Metadata,
    (_META, "TensorStorageMetadata"): TensorStorageMetadata,
    (_META, "BytesStorageMetadata"): BytesStorageMetadata,
    (_META, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_META, "TensorProperties"): TensorProperties,
    (_META, "StorageMeta"): StorageMeta,
    (_META, "MetadataIndex"): MetadataIndex,
    (_META, "_MEM_FORMAT_ENCODING"): _Enum,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): StorageInfo,
    ("torch.serialization", "_get_layout"): _ignore,
    ("torch", "Size"): _size,
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): RebuiltTensor,
}


class Namespace(_Record):
    """An `argparse.Namespace` (Megatron's saved `args`), kept as its attributes."""


class Opaque(_Record):
    """An inert value hubconv never needs (numpy RNG state arrays, scalars): kept, never interpreted."""

    def __repr__(self) -> str:
        return f"<opaque {self.__class__.__name__}>"


class OpaqueBytes(Opaque):
    """An `io.BytesIO` (Transformer Engine's `_extra_state` in Megatron checkpoints): kept, never interpreted."""

    def __repr__(self) -> str:
        return "<opaque BytesIO>"


def _parameter(data: Any, *rest: Any) -> Any:
    """`torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)`: the tensor itself."""
    return data


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for bytes (numpy arrays): latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class TypeName(str):
    """A class referenced as a value (OmegaConf's `ref_type`/`object_type`, Lightning's `hparams_type`): its name."""


class OmegaNode(_Record):
    """An OmegaConf container or value node (DictConfig, ListConfig, AnyNode, StringNode, ...): `plain` gives its
    content (`_content` of containers, `_val` of value nodes); metadata and `_parent` links are dropped.
    Interpolations such as `${model.hidden_size}` stay unresolved strings."""


class OmegaMetadata(_Record):
    """OmegaConf's per-node `Metadata` / `ContainerMetadata` (types, flags): never needed, dropped by `plain`."""


def _type_name(module: str, name: str) -> TypeName:
    return TypeName(f"{module}.{name}")


def _defaultdict(*args: Any) -> dict[Any, Any]:
    """`collections.defaultdict(factory)`: a plain dict (the factory, a TypeName stand-in, is never called)."""
    return {}


# OmegaConf configs as pickled by NeMo / Lightning `hyper_parameters` (protocol 2 spells builtins `__builtin__`).
OMEGACONF: dict[tuple[str, str], Any] = {
    ("omegaconf.dictconfig", "DictConfig"): type("DictConfig", (OmegaNode,), {"source": "omegaconf.DictConfig"}),
    ("omegaconf.listconfig", "ListConfig"): type("ListConfig", (OmegaNode,), {"source": "omegaconf.ListConfig"}),
    ("omegaconf.base", "ContainerMetadata"): OmegaMetadata,
    ("omegaconf.base", "Metadata"): OmegaMetadata,
    ("collections", "defaultdict"): _defaultdict,
    ("typing", "Any"): _type_name("typing", "Any"),
    **{
        ("omegaconf.nodes", node): type(node, (OmegaNode,), {"source": f"omegaconf.nodes.{node}"})
        for node in (
            "AnyNode",
            "StringNode",
            "IntegerNode",
            "FloatNode",
            "BooleanNode",
            "BytesNode",
            "PathNode",
            "ValueNode",
            "InterpolationResultNode",
        )
    },
    **{
        (module, name): _type_name("builtins", name)
        for module in ("builtins", "__builtin__")
        for name in ("dict", "list", "int", "long", "float", "str", "unicode", "bool", "bytes", "object", "tuple")
    },
}


class Inert(_Record):
    """An instance of a class from a package whose objects hubconv only ever carries, never calls (Megatron's
    enums and config dataclasses inside the saved `args`, e.g. `AttnBackend.auto`): its constructor arguments or
    state are recorded; nothing of the package is imported or run."""

    def __repr__(self) -> str:
        return f"<{getattr(self, 'source', 'inert')} {self.args!r}>"


def _inert(module: str, name: str) -> type[Inert]:
    return type(name, (Inert,), {"source": f"{module}.{name}"})


# Packages whose classes are recorded as `Inert` (any name in them): `(prefix, "*")` keys of an allow-list.
INERT_PACKAGES: dict[tuple[str, str], Any] = {("megatron.", "*"): _inert}


# torch.save files (`.pt`, nanoGPT `ckpt.pt`, Megatron `model_optim_rng.pt`, Lightning `.ckpt`): tensors, plain
# containers, argparse namespaces, and numpy RNG state (kept opaque).
TORCH_FILE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): RebuiltTensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch.serialization", "_get_layout"): _ignore,
    ("collections", "OrderedDict"): OrderedDict,
    ("argparse", "Namespace"): Namespace,
    ("_codecs", "encode"): _latin1,
    ("numpy.core.multiarray", "_reconstruct"): Opaque,
    ("numpy._core.multiarray", "_reconstruct"): Opaque,
    ("numpy.core.multiarray", "scalar"): Opaque,
    ("numpy._core.multiarray", "scalar"): Opaque,
    ("numpy", "ndarray"): Opaque,
    ("numpy", "dtype"): Opaque,
    ("_io", "BytesIO"): OpaqueBytes,
    **OMEGACONF,
    **INERT_PACKAGES,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, what: str, allowed: dict[tuple[str, str], Any]):
        super().__init__(io.BytesIO(data))
        self.what, self.allowed = what, allowed
        self.prefixes = [(prefix, make) for (prefix, star), make in allowed.items() if star == "*"]

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return TorchDtype(name)  # dtypes are pickled as globals and used as values
        if module == "torch" and name in _STORAGES:
            return StorageType(_STORAGES[name])
        try:
            return self.allowed[(module, name)]
        except KeyError:
            for prefix, make in self.prefixes:
                if module.startswith(prefix) and name.isidentifier() and not name.startswith("_"):
                    return make(module, name)
            raise pickle.UnpicklingError(f"{self.what}: refusing to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        # torch.save storages: ('storage', storage_type, key, location, numel)
        return pid


def loads(data: bytes, what: str, allow: dict[tuple[str, str], Any] | None = None) -> Any:
    """Unpickle `data` with an allow-list (default: DCP metadata and records); `what` names the file in errors."""
    return _Unpickler(data, what, _ALLOWED if allow is None else allow).load()


def plain(obj: Any, depth: int = 0) -> Any:
    """Stand-ins turned into plain data (dicts, lists, str) for provenance records and adapters."""
    if depth > 64:
        return "<nested too deeply>"
    if isinstance(obj, Opaque | Inert):
        return repr(obj)
    if isinstance(obj, RebuiltTensor):
        return f"<tensor {list(obj.size)}>"
    if isinstance(obj, TorchDtype | StorageType | TypeName):
        return str(obj)
    if isinstance(obj, OmegaMetadata):
        return None
    if isinstance(obj, type):  # a stand-in class referenced as a value (Lightning's `hparams_type`)
        return TypeName(getattr(obj, "source", obj.__name__))
    if isinstance(obj, OmegaNode):
        state = vars(obj)
        return plain(state["_content"] if "_content" in state else state.get("_val"), depth + 1)
    if isinstance(obj, _Record):
        state = {k: v for k, v in vars(obj).items() if not (k == "args" and not v)}
        return {k: plain(v, depth + 1) for k, v in state.items()}
    if isinstance(obj, dict):
        return {
            (k if isinstance(k, str | int | float | bool) or k is None else str(k)): plain(v, depth + 1)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v, depth + 1) for v in obj)
    return obj
