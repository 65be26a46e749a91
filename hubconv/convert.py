"""`hubconv convert`: native checkpoint -> transformers model folder, streamed and atomic."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hubconv import __version__
from hubconv.adapters import registry
from hubconv.adapters.base import Adapter, ConversionPlan
from hubconv.atomic import prepare_output, publish_dir, staging_dir
from hubconv.dtypes import DType, parse_user_dtype
from hubconv.errors import HubconvError, MappingError, OutputError
from hubconv.hf_target import TargetCheck, TargetSpec, compare
from hubconv.io.tensor import numel
from hubconv.io.writer import ShardPlan, ShardSink, parse_size, plan_shards, write_model

# Room left free for config/tokenizer files and filesystem overhead when checking disk space.
_DISK_MARGIN = 16 * 1024 * 1024


@dataclass
class ConvertResult:
    output: str
    adapter: str
    family: str
    files: dict[str, int]
    dropped: dict[str, str]
    config: dict[str, Any]
    native_args: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # the tokenizer source written (given, or found by the adapter)
    found_tokenizer: str | None = None  # a tokenizer the adapter found with the checkpoint


def load_adapter(adapter_spec: str, mapping: str | None = None) -> tuple[Adapter, str | None]:
    """The adapter `adapter_spec` names (and its family, if given), configured from a mapping file when one is given
    (`--adapter mapping --mapping FILE.yml`); adapters that take no mapping file refuse one."""
    adapter, family = registry.get(adapter_spec)
    if mapping is not None:
        configure = getattr(adapter, "with_mapping", None)
        if configure is None:
            raise HubconvError(f"--mapping {mapping}: adapter {adapter.name!r} takes no mapping file")
        adapter = configure(mapping)
    elif getattr(adapter, "with_mapping", None) is not None and getattr(adapter, "spec", None) is None:
        raise HubconvError(f"adapter {adapter.name!r} needs a mapping file: pass --mapping FILE.yml")
    return adapter, family


def build_plan(
    adapter_spec: str, ckpt: Any, model_args: str | Mapping[str, Any] | None, mapping: str | None = None
) -> ConversionPlan:
    adapter, family = load_adapter(adapter_spec, mapping)
    family = family or adapter.detect_family(ckpt)
    return adapter.plan(ckpt, family, adapter.load_args(model_args))


def output_dtypes(plan: ConversionPlan, out_dtype: DType | None) -> dict[str, DType]:
    """The dtype each target is written in: `out_dtype` for floating-point tensors when given, else its own."""
    return {t.name: (out_dtype if out_dtype and t.dtype.is_float else t.dtype) for t in plan.targets}


def shard_plan(plan: ConversionPlan, out_dtype: DType | None, shard_bytes: int) -> ShardPlan:
    """The deterministic shard plan of a conversion (file names, tensor offsets, header metadata)."""
    dtypes = output_dtypes(plan, out_dtype)
    return plan_shards(
        [(t.name, dtypes[t.name], t.shape) for t in plan.targets],
        shard_bytes,
        {"format": "pt", "converted_by": f"hubconv {__version__}", "source_adapter": plan.adapter},
    )


def _run(
    adapter: str,
    checkpoint: str,
    output: str,
    model_args: str | Mapping[str, Any] | None,
    out_dtype: DType | None,
    shard_bytes: int,
    progress: bool,
    use_cache: bool,
    tokenizer: str | None = None,
    sink: ShardSink | None = None,
    mapping: str | None = None,
    auto_tokenizer: bool = True,
    shown: Callable[[str], str] = str,
) -> ConversionPlan:
    with load_adapter(adapter, mapping)[0].open(checkpoint) as ckpt:
        plan = build_plan(adapter, ckpt, model_args, mapping)
        targets = {t.name: t for t in plan.targets}
        dtypes = output_dtypes(plan, out_dtype)
        dominant = max(plan.targets, key=lambda t: t.dtype.itemsize * numel(t.shape))
        shards = shard_plan(plan, out_dtype, shard_bytes)
        staging = None
        check: TargetCheck | None = None
        try:
            staging = staging_dir(output, "tmp")
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            _check_free_space(staging, shards, streaming=sink is not None)
            check = TargetCheck(
                plan.model_type,
                plan.config,
                plan.generation_config,
                staging,
                str(dtypes[dominant.name]),
                use_cache=use_cache,
            )
            # Completeness against the real transformers architecture before the first byte is written
            # (or uploaded, with a streaming sink): a missing or misshapen parameter costs nothing yet.
            _compare(check.result(), plan)
            write_model(shards, targets, staging, show_progress=progress, sink=sink)
            if tokenizer is None and auto_tokenizer and plan.tokenizer:
                tokenizer = plan.tokenizer  # found with the checkpoint (nanoGPT meta.pkl)
                plan.notes.append(f"tokenizer: {os.path.basename(tokenizer)} found with the checkpoint")
            if tokenizer:
                notes = _add_tokenizer(tokenizer, staging, plan)
                plan.notes.extend(notes)
            with open(os.path.join(staging, "hubconv.json"), "w") as f:
                json.dump(_record(plan, checkpoint, mapping, adapter, shown), f, indent=2)
                f.write("\n")
            publish_dir(staging, output)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{output}: no space left on the device while writing; nothing was written") from None
            raise OutputError(f"{output}: {e.strerror or e}") from None
        finally:
            if check is not None:
                check.cancel()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return plan


def convert(
    adapter: str,
    checkpoint: str,
    output: str,
    *,
    model_args: str | Mapping[str, Any] | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    use_cache: bool = True,
    tokenizer: str | None = None,
    sink: ShardSink | None = None,
    mapping: str | None = None,
    auto_tokenizer: bool = True,
    shown: Callable[[str], str] = str,
) -> ConvertResult:
    """Convert `checkpoint` with `adapter` into the HF folder `output` (written atomically); `mapping` is the YAML
    file of `--adapter mapping`. Without `tokenizer`, a tokenizer the adapter finds with the checkpoint is written
    (unless `auto_tokenizer` is false). `shown` turns the local paths recorded in `hubconv.json` (which is published
    with the model) into what may be shown, e.g. paths relative to the release config's folder."""
    start = time.monotonic()
    prepare_output(output, overwrite, input_paths(checkpoint, tokenizer, model_args, mapping))
    out_dtype = parse_user_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    plan = _run(
        adapter,
        checkpoint,
        output,
        model_args,
        out_dtype,
        shard_bytes,
        progress,
        use_cache,
        tokenizer,
        sink,
        mapping,
        auto_tokenizer,
        shown,
    )
    files = {n: os.path.getsize(os.path.join(output, n)) for n in sorted(os.listdir(output)) if not n.startswith(".")}
    return ConvertResult(
        output,
        plan.adapter,
        plan.family,
        files,
        plan.dropped,
        plan.config,
        plan.native_args,
        time.monotonic() - start,
        plan.notes,
        tokenizer or (plan.tokenizer if auto_tokenizer else None),
        plan.tokenizer,
    )


def input_paths(
    checkpoint: str | None,
    tokenizer: str | None,
    model_args: str | Mapping[str, Any] | None,
    mapping: str | None = None,
) -> dict[str, str | None]:
    """The local paths a conversion reads, by label, for `prepare_output` (a model-args flavor name that
    is not a path is skipped there)."""
    return {
        "checkpoint": checkpoint,
        "tokenizer": tokenizer,
        "model args file": model_args if isinstance(model_args, str) else None,
        "mapping file": mapping,
    }


def _add_tokenizer(source: str, folder: str, plan: ConversionPlan) -> list[str]:
    """Write HF tokenizer files next to the weights; failed checks abort, warnings become notes."""
    from hubconv.tokenizers import reconcile_special_tokens, write_tokenizer

    result = write_tokenizer(source, folder, model_max_length=plan.config.get("max_position_embeddings"))
    checks = list(result.checks) + list(reconcile_special_tokens(folder, result, plan.config["vocab_size"]))
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise HubconvError(f"tokenizer {source}: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    return [f"tokenizer {c.name}: {c.detail}" for c in checks if c.status == "warn"]


def _check_free_space(folder: str, shards: ShardPlan, streaming: bool = False) -> None:
    sizes = sorted(shards.file_sizes().values(), reverse=True)
    need = sum(sizes[:2] if streaming else sizes) + _DISK_MARGIN  # streaming keeps at most two shards
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"{folder}: not enough free disk space: the model needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


def _compare(spec: TargetSpec, plan: ConversionPlan) -> None:
    """The plan against the transformers architecture; a mis-shaped target names the rule that produced it."""
    produced = {t.name: t.shape for t in plan.targets}
    try:
        compare(spec, produced)
    except MappingError as e:
        wrong = [k for k in produced if k in spec.params and spec.params[k] != produced[k] and k in plan.origins]
        if not wrong:
            raise
        raise MappingError(f"{e} ({'; '.join(f'{k} comes from {plan.origins[k]}' for k in wrong[:3])})") from None


def _record(
    plan: ConversionPlan,
    checkpoint: str,
    mapping: str | None = None,
    spec: str = "",
    shown: Callable[[str], str] = str,
) -> dict[str, Any]:
    """Provenance written next to the weights (`hubconv.json`); local paths pass through `shown`."""
    mapped: dict[str, Any] = {}
    if registry.is_plugin_spec(spec):  # `hubconv smoke DIR` finds the plugin again from here
        file, sep, cls = spec.partition(".py:")
        mapped["adapter_spec"] = f"{shown(file + '.py')}:{cls}" if sep else spec
    if mapping is not None:
        with open(mapping, "rb") as f:
            mapped["mapping"] = {"path": shown(mapping), "sha256": hashlib.sha256(f.read()).hexdigest()}
    return {
        "hubconv_version": __version__,
        "adapter": plan.adapter,
        "family": plan.family,
        "checkpoint": shown(checkpoint),  # absolute local paths must not be published
        "native_args": plan.native_args,
        "dropped": plan.dropped,
        "lossy": plan.lossy,
        **mapped,  # the mapping file as given, and its digest
    }
