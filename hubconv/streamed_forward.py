"""Run a converted model through transformers one layer at a time, whatever its size.

The model is built from the written `config.json` on the meta device (`AutoModelForCausalLM.from_config`,
the classes `from_pretrained` instantiates). Its own `forward` then runs unchanged — embeddings, rotary
embedding module, mask creation, attention implementation, decoder layers, final norm, head — while
forward hooks materialize each weight-owning module just before it runs and put it back on the meta device
right after: each decoder layer (found as the model's `ModuleList` of `num_hidden_layers` blocks) and each
module outside the layers that owns weights (embeddings, final norm, head). Memory holds one such module
plus activations. A model whose forward reads a weight outside its owner's call fails loudly (a meta
tensor), and `hubconv smoke` falls back to loading the whole model.

Weights come from a `WeightSource`: the safetensors files of a folder (`FileWeights`), or, in
`release --stream-upload` mode where the shards never exist together on disk, the conversion plan's lazy
views (`PlanWeights`), cast exactly as the writer did and checked against the sha256 of each tensor as it
was written into the uploaded shard.

Load checks (missing / unexpected / mismatched keys) come from transformers' own loading routine
(`convert_and_load_state_dict_in_model`) run on the meta model with meta tensors of the converted names,
shapes and dtypes: nothing is read.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hubconv.errors import HubconvError

if TYPE_CHECKING:
    import torch

    from hubconv.adapters.base import ConversionPlan

# Full-load models up to this size (in the smoke dtype) when they also fit a quarter of the free memory:
# for small models one load is cheaper than re-reading every layer per generated token.
FULL_LOAD_MAX_BYTES = int(os.environ.get("HUBCONV_FULL_LOAD_MAX_BYTES", 512 * 2**20))
# Line-based progress for passes over models at least this large.
PROGRESS_MIN_BYTES = 256 * 2**20

MODES = ("auto", "full", "stream")


class StreamUnsupported(HubconvError):
    """The architecture cannot be run one module at a time (its forward reads weights elsewhere)."""


class DigestMismatch(HubconvError):
    """A tensor read for verification differs from the bytes written into the uploaded shard."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name (BF16, F32, ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from hubconv.dtypes import BY_NAME
        from hubconv.io.tensor import numel

        return numel(self.shape) * BY_NAME[self.dtype].itemsize


class WeightSource(Protocol):
    """Converted tensors by name: metadata up front, data one tensor at a time."""

    kind: str  # "files" or "plan"
    tensors: dict[str, TensorInfo]

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        """Write tensor `name` into `out` (same shape; any dtype and device: cast and moved by torch)."""

    def close(self) -> None: ...


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    from hubconv.dtypes import BY_NAME

    return getattr(torch, BY_NAME[name].torch_name)


class _Maps:
    """Read-only memory maps of files, by path: tensors are copied straight out of them, then the pages are dropped
    from this process (`MADV_DONTNEED`; they stay in the page cache), so resident memory does not grow with the
    number of bytes read."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def copy(
        self, path: str, offset: int, nbytes: int, dtype: torch.dtype, out: torch.Tensor, digest: Any = None
    ) -> None:
        """`nbytes` at `offset` of `path`, as `dtype` values, into the flat tensor `out` (cast by torch); the bytes
        also feed the hashlib object `digest` when given."""
        import warnings

        import torch

        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        mapped = self._maps[path]
        if nbytes:
            with warnings.catch_warnings():  # a read-only mapping: torch warns that the tensor is not writable
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(mapped, dtype=torch.uint8, offset=offset, count=nbytes)
            out.copy_(src.view(dtype))
            if digest is not None:
                digest.update(memoryview(mapped)[offset : offset + nbytes])
            lo = offset // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, lo, offset + nbytes - lo)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; released with the tensor
                pass
        self._maps.clear()


class FileWeights:
    """The safetensors files of a converted folder (single file or index), memory-mapped (`_Maps`)."""

    kind = "files"

    def __init__(self, model_dir: str):
        from hubconv.io.safetensors_reader import read_header
        from hubconv.io.writer import INDEX_FILE, SINGLE_FILE

        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [SINGLE_FILE]
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute begin, end)
        self._maps = _Maps()
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.exists(path):
                raise HubconvError(f"{path}: weight file missing")
            header, start = read_header(path)
            for key, meta in header.items():
                if key != "__metadata__":
                    self.tensors[key] = TensorInfo(meta["dtype"], tuple(meta["shape"]))
                    begin, end = meta["data_offsets"]
                    self._where[key] = (path, start + begin, start + end)

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        path, begin, end = self._where[name]
        info = self.tensors[name]
        self._maps.copy(path, begin, end - begin, _torch_dtype(info.dtype), out.view(-1))

    def close(self) -> None:
        self._maps.close()


class PlanWeights:
    """The conversion plan's lazy views, cast to the written dtypes, as the writer produced them.

    `written` holds each tensor's dtype, shape and sha256 as recorded from the shard files before they
    were uploaded (`DigestingSink`); every tensor read here is hashed and compared with it, so the forward
    provably ran on the uploaded bytes."""

    kind = "plan"

    def __init__(self, plan: ConversionPlan, written: dict[str, dict[str, Any]]):
        self._targets = {t.name: t for t in plan.targets}
        missing = sorted(set(written) - set(self._targets))
        if missing:
            raise DigestMismatch(f"tensor {missing[0]!r} was uploaded but the conversion plan does not produce it")
        self.tensors = {n: TensorInfo(w["dtype"], tuple(w["shape"])) for n, w in written.items()}
        self._digests = {n: w["sha256"] for n, w in written.items()}
        self.verified: set[str] = set()
        self._maps = _Maps()

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        import numpy as np
        import torch

        from hubconv.dtypes import BY_NAME, cast
        from hubconv.views import blocks

        view, info = self._targets[name], self.tensors[name]
        dst = BY_NAME[info.dtype]
        flat = out.view(-1)
        check = name not in self.verified  # later passes (generation) read what the first one proved
        digest, pos = hashlib.sha256(), 0
        segments = view.segments() if view.dtype is dst else None
        if segments is not None and all(seg.nbytes % dst.itemsize == 0 for seg in segments):
            for seg in segments:  # untransformed bytes: straight from the source file, as the writer copies them
                n = seg.nbytes // dst.itemsize
                part = flat[pos : pos + n]
                self._maps.copy(
                    seg.path, seg.offset, seg.nbytes, _torch_dtype(info.dtype), part, digest if check else None
                )
                pos += n
        else:
            for block in blocks(view):  # transformed (permuted, concatenated, cast): block by block, as written
                raw = np.ascontiguousarray(cast(block, view.dtype, dst, what=f"tensor {name!r}"))
                if check:
                    digest.update(memoryview(raw).cast("B"))
                values = torch.from_numpy(raw.reshape(-1)).view(_torch_dtype(info.dtype))
                flat[pos : pos + values.numel()].copy_(values)
                pos += values.numel()
        if pos * dst.itemsize != info.nbytes:
            raise DigestMismatch(
                f"tensor {name!r}: the conversion plan produced {pos * dst.itemsize} bytes, {info.nbytes} were uploaded"
            )
        if check and digest.hexdigest() != self._digests[name]:
            raise DigestMismatch(
                f"tensor {name!r}: the bytes read through the conversion plan differ from the uploaded shard "
                "(sha256 mismatch): did the checkpoint change during the release?"
            )
        self.verified.add(name)

    def close(self) -> None:
        self._maps.close()


def shard_digests(path: str) -> dict[str, dict[str, Any]]:
    """dtype, shape and sha256 of every tensor of a written safetensors shard, read back from the file."""
    from hubconv.io.safetensors_reader import read_header

    header, start = read_header(path)
    out: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            f.seek(start + begin)
            digest, left = hashlib.sha256(), end - begin
            while left:
                chunk = f.read(min(left, 8 << 20))
                if not chunk:
                    raise HubconvError(f"{path}: ends inside tensor {name!r}")
                digest.update(chunk)
                left -= len(chunk)
            out[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "sha256": digest.hexdigest()}
    return out


class DigestingSink:
    """A `ShardSink` wrapper that records each finished shard's per-tensor sha256 before passing it on
    (to the streaming uploader, which uploads and deletes it)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tensors: dict[str, dict[str, Any]] = {}

    def reserve(self) -> None:
        self.inner.reserve()

    def done(self, path: str) -> None:
        self.tensors.update(shard_digests(path))
        self.inner.done(path)

    def flush(self) -> None:
        self.inner.flush()

    def skip(self, path: str) -> bool:
        """A shard another worker wrote and uploaded (sharded publishing, hubconv.workers): not written here; its
        tensors' digests come from the inner sink (that worker's manifest)."""
        skip = getattr(self.inner, "skip", None)
        if skip is None or not skip(path):
            return False
        self.tensors.update(self.inner.tensor_digests(path))
        return True


# --- the streamed model -------------------------------------------------------------------------------


@dataclass
class PassStats:
    """What one forward pass cost."""

    seconds: float = 0.0
    load_seconds: float = 0.0  # reading + casting weights (included in seconds)
    bytes_loaded: int = 0


@dataclass
class StreamStats:
    passes: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    bytes_loaded: int = 0
    peak_group_bytes: int = 0
    groups: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """One line per quarter of a pass (stderr), for long passes in CI logs; silent for small models."""

    def __init__(self, enabled: bool, total: int, what: str):
        self.enabled, self.total, self.what = enabled, total, what
        self.done, self.next_mark, self.start = 0, 1, time.perf_counter()

    def step(self) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.done * 4 >= self.next_mark * self.total:
            while self.done * 4 >= self.next_mark * self.total:
                self.next_mark += 1
            elapsed = time.perf_counter() - self.start
            print(f"smoke: {self.what}: {self.done}/{self.total} modules, {elapsed:.1f}s", file=sys.stderr, flush=True)


def _layer_list(model: Any, n_layers: int) -> tuple[str, Any]:
    """The model's decoder layer list: the ModuleList of `n_layers` blocks holding the most parameters."""
    import torch.nn as nn

    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None or best[0] == 0:
        raise StreamUnsupported(
            f"{type(model).__name__}: no list of {n_layers} decoder layers found in the model structure"
        )
    return best[1], best[2]


class StreamedModel:
    """A transformers causal LM on the meta device whose weight-owning modules load on use.

    `logits(tokens, positions)` and `generate(ids, n)` call the model's own forward; `loading_info` is the
    meta-device load report (missing / unexpected / mismatched keys, as `from_pretrained` reports them)."""

    def __init__(
        self,
        model_dir: str,
        source: WeightSource,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        progress: bool | None = None,
    ):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source, self.device, self.dtype = source, device, dtype
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        except (ValueError, KeyError) as e:
            raise HubconvError(f"{model_dir}/config.json: transformers cannot build the model: {e}") from None
        self.model.eval()
        self.config = self.model.config
        try:  # from_pretrained reads generation_config.json; from_config derives one from config.json
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        except OSError:
            pass
        self.loading_info = self._load_checks()
        self._keys = self._source_keys()
        self._groups = self._find_groups()
        total = sum(source.tensors[k].nbytes for k in set(self._keys.values()))
        self.progress = total >= PROGRESS_MIN_BYTES if progress is None else progress
        self.stats = StreamStats(groups=len(self._groups))
        self._pass_stats = PassStats()
        self._bar: _Progress | None = None
        self._pool: dict[tuple[tuple[int, ...], Any], list[Any]] = {}
        self._materialize_buffers()
        self._hooks = [h for module in self._groups for h in self._hook(module)]

    # -- load checks

    def _load_checks(self) -> dict[str, list[str]]:
        import torch
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        model = self.model
        meta = {
            n: torch.empty(t.shape, dtype=_torch_dtype(t.dtype), device="meta") for n, t in self.source.tensors.items()
        }
        load_config = LoadStateDictConfig(
            device_map={"": "meta"},
            dtype=getattr(torch, self.dtype),
            weight_mapping=get_model_conversion_mapping(model, None, None),
        )
        self._weight_mapping = load_config.weight_mapping or []
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=meta, load_config=load_config)
            model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
            model._adjust_missing_and_unexpected_keys(info)
        return {
            "missing_keys": sorted(info.missing_keys),
            "unexpected_keys": sorted(info.unexpected_keys),
            "mismatched_keys": sorted(str(m) for m in info.mismatched_keys),
        }

    def _source_keys(self) -> dict[str, str]:
        """Model state-dict key -> converted tensor name (transformers' renaming rules; tied targets)."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.model
        state = model.state_dict()
        renamings = [w for w in self._weight_mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in self._weight_mapping if isinstance(w, WeightConverter)]
        keys: dict[str, str] = {}
        for name in self.source.tensors:
            renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
            if pattern is not None:
                raise StreamUnsupported(
                    f"tensor {name!r}: {type(model).__name__} converts weights while loading ({pattern}); "
                    "streamed verification supports plain renames only"
                )
            if renamed in state:
                keys[renamed] = name
        for target, tied_to in getattr(model, "all_tied_weights_keys", {}).items():
            if target not in keys and tied_to in keys:
                keys[target] = keys[tied_to]
        return keys

    # -- module groups and hooks

    def _find_groups(self) -> list[Any]:
        """Decoder layers, then every other module owning state-dict entries (embeddings, norms, head)."""
        model = self.model
        n_layers = int(getattr(self.config.get_text_config(), "num_hidden_layers", 0) or 0)
        prefix, layers = _layer_list(model, n_layers)
        groups: dict[str, Any] = {f"{prefix}.{i}": layer for i, layer in enumerate(layers)}
        for key in model.state_dict():
            if key.startswith(prefix + "."):
                continue
            owner = key.rpartition(".")[0]
            groups.setdefault(owner, model.get_submodule(owner) if owner else model)
        if model in groups.values():
            raise StreamUnsupported(f"{type(model).__name__}: weights owned by the top-level model itself")
        self._group_keys: dict[int, list[str]] = {id(m): [] for m in groups.values()}
        for key in model.state_dict():
            parts = key.split(".")
            owner = next(".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in groups)
            self._group_keys[id(groups[owner])].append(key)
        return list(groups.values())

    def _materialize_buffers(self) -> None:
        """Non-persistent buffers (rotary inverse frequencies, ...) on the device, initialized by the model's own
        `_init_weights`, as `from_pretrained` does for entries not in the checkpoint."""
        import torch
        from transformers.modeling_utils import _load_parameter_into_model

        owners = set()
        for key, buf in self.model.named_non_persistent_buffers():
            _load_parameter_into_model(self.model, key, torch.empty_like(buf, device=self.device))
            owners.add(key.rpartition(".")[0])
        with torch.no_grad():
            for owner in sorted(owners):
                self.model._init_weights(self.model.get_submodule(owner))

    def _hook(self, module: Any) -> list[Any]:
        return [
            module.register_forward_pre_hook(lambda m, args: self._load_group(m)),
            module.register_forward_hook(lambda m, args, out: self._release_group(m)),
        ]

    def _load_group(self, module: Any) -> None:
        import torch
        from transformers.modeling_utils import _load_parameter_into_model

        start = time.perf_counter()
        size = 0
        for key in self._group_keys[id(module)]:
            current = self.model.get_parameter_or_buffer(key)
            name = self._keys.get(key)
            if name is None:
                raise HubconvError(f"{key}: no converted tensor for this weight")
            pool = self._pool.get((tuple(current.shape), current.dtype))
            value = pool.pop() if pool else torch.empty(current.shape, dtype=current.dtype, device=self.device)
            self.source.copy_into(name, value)
            size += value.numel() * value.element_size()
            _load_parameter_into_model(self.model, key, value)
        self.stats.peak_group_bytes = max(self.stats.peak_group_bytes, size)
        self._pass_stats.bytes_loaded += size
        self._pass_stats.load_seconds += time.perf_counter() - start

    def _release_group(self, module: Any) -> None:
        """Back to the meta device; the buffers are kept for the next module of the same shapes (every decoder
        layer after the first reuses the memory of the one before: no allocation, no page faults)."""
        import torch
        from transformers.modeling_utils import _load_parameter_into_model

        for key in self._group_keys[id(module)]:
            current = self.model.get_parameter_or_buffer(key)
            if current.device.type == "meta":
                continue
            self._pool.setdefault((tuple(current.shape), current.dtype), []).append(current.data)
            _load_parameter_into_model(self.model, key, torch.empty_like(current, device="meta"))
        if self._bar is not None:
            self._bar.step()

    @contextmanager
    def _pass(self, what: str) -> Iterator[PassStats]:
        """One forward pass, in which any op given a weight still on the meta device stops the pass: some torch
        ops (F.linear with a CPU input) silently return uninitialized memory for a meta weight."""
        self._pass_stats = PassStats()
        self._bar = _Progress(self.progress, len(self._groups), what)
        start = time.perf_counter()
        try:
            with _no_meta_inputs(type(self.model).__name__):
                yield self._pass_stats
        finally:
            self._pass_stats.seconds = time.perf_counter() - start
            self.stats.passes += 1
            self.stats.seconds += self._pass_stats.seconds
            self.stats.load_seconds += self._pass_stats.load_seconds
            self.stats.bytes_loaded += self._pass_stats.bytes_loaded
            for module in self._groups:  # a failed pass leaves nothing materialized
                if any(
                    self.model.get_parameter_or_buffer(k).device.type != "meta" for k in self._group_keys[id(module)]
                ):
                    self._release_group(module)
            self._bar = None

    # -- running

    def forward(self, input_ids: torch.Tensor, *, what: str = "forward", **kwargs: Any) -> Any:
        import torch

        with torch.no_grad(), self._pass(what):
            return self.model(input_ids=input_ids.to(self.device), **kwargs)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of one pass, called as users call the model: `use_cache` is left to the config (with
        `use_cache=False`, transformers reads non-consecutive position ids as packed sequences)."""
        kwargs = {} if positions is None else {"position_ids": positions.reshape(1, -1).to(self.device)}
        return self.forward(tokens, what="parity forward", **kwargs).logits

    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, eos: set[int] | None = None
    ) -> tuple[torch.Tensor, bool]:
        """Greedy decoding with the model's own KV cache: (new token ids, all logits finite)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        new: list[int] = []
        finite = True
        step_input = ids
        for i in range(max_new_tokens):
            out = self.forward(step_input, what=f"generate token {i + 1}/{max_new_tokens}", cache=cache, use_cache=True)
            last = out.logits[0, -1].float()
            finite = finite and bool(torch.isfinite(last).all())
            token = int(last.argmax())
            new.append(token)
            if eos and token in eos:
                break
            step_input = torch.tensor([[token]])
        return torch.tensor(new, dtype=torch.long), finite

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._pool.clear()
        self.source.close()


@contextmanager
def _no_meta_inputs(model_name: str) -> Iterator[None]:
    """Raise StreamUnsupported when an op receives a meta tensor: the model's forward used a weight outside the
    call of the module that owns it (or a module ran without its weights), so streaming cannot serve it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoMeta(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves((args, kwargs))):
                raise StreamUnsupported(
                    f"{model_name}: its forward uses a weight outside the module that owns it ({func} on a "
                    "weight not loaded): streamed verification cannot run it"
                )
            return func(*args, **kwargs)

    with NoMeta():
        yield


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bar or load report for the meta-device load check (its result is reported)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if was_enabled:
            logging.enable_progress_bar()


def weights_bytes(source: WeightSource, dtype: str) -> int:
    """Size of every converted tensor in the smoke dtype (float tensors cast, others as stored)."""
    import torch

    from hubconv.dtypes import BY_NAME
    from hubconv.io.tensor import numel

    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(
        numel(t.shape) * (itemsize if BY_NAME[t.dtype].is_float else BY_NAME[t.dtype].itemsize)
        for t in source.tensors.values()
    )


def choose_mode(mode: str, full_bytes: int, available: int) -> str:
    """ "full" or "stream": `auto` full-loads small models (cheaper than re-reading layers per token)."""
    if mode not in MODES:
        raise HubconvError(f"smoke: unknown load mode {mode!r} (auto, full or stream)")
    if mode != "auto":
        return mode
    return "full" if full_bytes <= min(FULL_LOAD_MAX_BYTES, available // 4) else "stream"


def plan_weights(
    adapter: str,
    checkpoint: str,
    model_args: Any,
    mapping: str | None,
    written: dict[str, dict[str, Any]],
) -> Callable[[], Any]:
    """A context factory opening the checkpoint and yielding `PlanWeights` over its rebuilt conversion plan."""

    @contextmanager
    def opened() -> Iterator[PlanWeights]:
        from hubconv.convert import build_plan, load_adapter

        with load_adapter(adapter, mapping)[0].open(checkpoint) as ckpt:
            yield PlanWeights(build_plan(adapter, ckpt, model_args, mapping), written)

    return opened
