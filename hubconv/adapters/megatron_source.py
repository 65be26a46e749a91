"""The model tensors of a Megatron-LM / NeMo checkpoint, rank by rank, under one canonical naming.

Four containers reach the Megatron adapter (readers in `hubconv.io`): Megatron-LM legacy rank folders
(`mp_rank_TT[_PPP]/model_optim_rng.pt`, model under `model.`, or `model0.`, `model1.`, ... with virtual
pipeline stages), megatron-core `torch_dist` folders (one global checkpoint; decoder layers stacked on a
leading axis), NeMo `.nemo` archives (`model.` or, with `megatron_amp_O2`, `model.module.`, per rank) and
NeMo Lightning `.ckpt` files (`state_dict.model.`). Whatever the container and whichever of the two key
namings (megatron-core, or the legacy `language_model` one of GPT-SW3 and older NeMo), every rank's model
tensors are renamed to one *canonical fused* naming — megatron-core names with the norms under their own
names (the Transformer-Engine spec fuses them into the following linear layer):

    embedding.word_embeddings.weight            embedding.position_embeddings.weight
    decoder.layers.N.input_layernorm.{weight,bias}
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.{weight,bias}
    decoder.layers.N.mlp.linear_fc1.{weight,bias}   decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}        output_layer.weight

(layer numbers stage-local, as saved). Everything else is accounted for: Transformer Engine `_extra_state`,
the legacy rotary `inv_freq` buffer, optimizer and RNG state, training counters; an unknown tensor or entry
is an error naming it. `merged` then un-shards the ranks with `megatron_layouts.merge_model` into global
tensors with fused QKV and gated fc1 split (`linear_q/k/v`, `linear_fc1_gate/up`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hubconv import views as V
from hubconv.adapters.megatron_layouts import CORE_TABLE, Attention, Layout, Merged, merge_model
from hubconv.errors import CheckpointError, MappingError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

# Per-rank legacy / TE names -> canonical fused names; applied in order, each at most once.
_CANON: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^language_model\.embedding\.", "embedding."),
        (r"^language_model\.(?:encoder|transformer)\.layers\.", "decoder.layers."),
        (r"^language_model\.(?:encoder|transformer)\.final_(?:layer)?norm\.", "decoder.final_layernorm."),
        (r"^language_model\.output_layer\.", "output_layer."),
        (r"^word_embeddings_for_head\.", "output_layer."),
        (r"^decoder\.final_norm\.", "decoder.final_layernorm."),
        (r"\.(?:self_attention|attention)\.query_key_value\.", ".self_attention.linear_qkv."),
        (r"\.(?:self_attention|attention)\.dense\.", ".self_attention.linear_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.linear_fc1."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.linear_fc2."),
        (r"\.post_attention_(?:layer)?norm\.", ".pre_mlp_layernorm."),
        (r"\.input_norm\.", ".input_layernorm."),  # legacy ParallelTransformerLayer since get_norm (2023)
        (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),
        (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".pre_mlp_layernorm.\1"),
    )
)

# Canonical fused names a GPT model may hold (after the layer prefix for layer tensors).
_LAYER_PARAMS = re.compile(
    r"(input_layernorm|pre_mlp_layernorm)\.(weight|bias)"
    r"|self_attention\.(linear_qkv|linear_proj)\.(weight|bias)"
    r"|mlp\.(linear_fc1|linear_fc2)\.(weight|bias)"
)
_GLOBAL_PARAMS = {
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias",
    "output_layer.weight",
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_RANK_PREFIX = re.compile(r"^(?:mp_rank_\d+(?:_\d+)?|tp_rank_\d+_pp_rank_\d+)/")

# Non-parameter tensors inside the model state dict: (pattern, reason).
_MODEL_DROPS = (
    (re.compile(r"\._extra_state$"), "Transformer Engine _extra_state (FP8 scaling metadata), not a parameter"),
    (
        re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$"),
        "rotary inverse-frequency buffer (recomputed from rotary_base; checked against it)",
    ),
)

# Top-level entries of Megatron rank files / common.pt, NeMo Lightning checkpoints: reason for dropping each.
_ENTRY_REASONS = {
    "args": "Megatron training arguments: converted into config.json",
    "checkpoint_version": "Megatron checkpoint format version (read to order fused QKV)",
    "iteration": "training iteration counter (training only)",
    "num_floating_point_operations_so_far": "training FLOP counter (training only)",
    "opt_param_scheduler": "learning-rate scheduler state (training only)",
    "lr_scheduler": "learning-rate scheduler state (training only)",
    "rerun_state_machine": "Megatron rerun state machine (training only)",
    "content_metadata": "Megatron sharded-checkpoint content metadata",
    "tokens_so_far": "training token counter (training only)",
    "epoch": "Lightning epoch counter (training only)",
    "global_step": "Lightning step counter (training only)",
    "pytorch-lightning_version": "Lightning version string",
    "loops": "Lightning loop state (training only)",
    "callbacks": "Lightning callback state (training only)",
    "hparams_name": "Lightning hyper-parameter name",
    "hparams_type": "Lightning hyper-parameter container type",
    "hyper_parameters": "NeMo model configuration: converted into config.json",
    "lr_schedulers": "learning-rate scheduler state (training only)",
    "MixedPrecisionPlugin": "Lightning mixed-precision plugin state (training only)",
    "NLPDDPStrategy": "Lightning strategy state (training only)",
    "datamodule_hyper_parameters": "Lightning datamodule configuration",
    "optimizer": "optimizer state (training only)",
    "optimizer_states": "optimizer state (training only)",
    "rng_state": "random-number-generator state (training only)",
    "dist_metadata": "megatron-core sharded-checkpoint metadata",
}


def canonical(key: str) -> str:
    """A rank-local model key in the canonical fused naming (see the module docstring)."""
    for pattern, repl in _CANON:
        key = pattern.sub(repl, key, count=1)
    return key


def _is_parameter(key: str) -> bool:
    m = _LAYER_KEY.match(key)
    return bool(_LAYER_PARAMS.fullmatch(m.group(2))) if m else key in _GLOBAL_PARAMS


def entry_reason(name: str) -> str | None:
    """Why a non-model tensor or entry of a Megatron / NeMo checkpoint is dropped, or None when unknown."""
    name = _RANK_PREFIX.sub("", name, count=1)
    first = name.split(".", 1)[0].split("/", 1)[0]
    if name.startswith("common.pt:"):
        return entry_reason(name.removeprefix("common.pt:"))
    if "._extra_state/" in name or name.endswith("._extra_state"):
        return "Transformer Engine _extra_state (FP8 scaling metadata), not a parameter"
    return _ENTRY_REASONS.get(first)


@dataclass
class RankModels:
    """Every rank's model tensors in the canonical fused naming, and what was set aside."""

    shards: dict[tuple[int, int, int], dict[str, LazyTensor]]
    tp: int
    pp: int
    vp: int
    naming: str  # "core" or "legacy": the key naming the checkpoint used
    stacked: bool = False  # torch_dist: one global rank (layers unstacked from [L, ...] tensors)
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    inv_freq: LazyTensor | None = None  # the legacy rotary buffer, checked against the rotary args


def _model_prefix(keys: list[str], where: str) -> tuple[str, ...]:
    """The model prefixes of one rank's keys: `model.`, `model.module.` (NeMo O2), `model0.`, `model1.` (virtual)."""
    chunks = sorted({m.group(1) for k in keys if (m := re.match(r"^(model\d+)\.", k))}, key=lambda s: int(s[5:]))
    if chunks:
        if any(k.startswith("model.") for k in keys):
            raise CheckpointError(f"{where}: mixes model. and model0./model1. (virtual pipeline) keys")
        if chunks != [f"model{i}" for i in range(len(chunks))]:
            raise CheckpointError(f"{where}: virtual pipeline chunks {chunks} are not model0..model{len(chunks) - 1}")
        return tuple(f"{c}." for c in chunks)
    if any(k.startswith("model.module.") for k in keys):
        return ("model.module.",)
    return ("model.",)


def _split_rank(
    tensors: Mapping[str, LazyTensor], where: str, out: RankModels, label: str, prefixes: tuple[str, ...] = ()
) -> list[dict[str, LazyTensor]]:
    """One rank's tensors -> one canonical dict per virtual chunk; non-model tensors go to `out.dropped`.
    `prefixes`: the model's key prefixes, one per chunk (default: detected, see `_model_prefix`)."""
    prefixes = prefixes or _model_prefix(list(tensors), where)
    chunks: list[dict[str, LazyTensor]] = [{} for _ in prefixes]
    for key, t in tensors.items():
        v = next((i for i, prefix in enumerate(prefixes) if key.startswith(prefix)), None)
        if v is None:
            reason = entry_reason(key)
            if reason is None:
                raise MappingError(f"{where}: tensor {label}{key!r} is not part of a Megatron GPT checkpoint")
            out.dropped[label + key] = reason
            continue
        local = key[len(prefixes[v]) :]
        drop = next((r for p, r in _MODEL_DROPS if p.search(local)), None)
        if drop is not None:
            out.dropped[label + key] = drop
            if local.endswith("inv_freq") and out.inv_freq is None:
                out.inv_freq = t
            continue
        name = canonical(local)
        if not _is_parameter(name):
            raise MappingError(f"{where}: tensor {label}{key!r} is not a parameter of Megatron's GPT model")
        if name in chunks[v]:
            raise MappingError(f"{where}: {label}{key!r} and another key are both {name!r}")
        if local.startswith("language_model."):
            out.naming = "legacy"
        chunks[v][name] = V.rename(t, name) if t.name != name else t
    return chunks


def rank_models(ckpt: Checkpoint) -> RankModels:
    """Split a Megatron / NeMo checkpoint into per-rank canonical model tensors (see the module docstring)."""
    if ckpt.format == "megatron-torch-dist":
        return _torch_dist(ckpt)
    tensors = dict(ckpt.tensors)
    ranks = ckpt.values.get("ranks")
    if ckpt.format == "torch":  # a NeMo Lightning .ckpt: state_dict.model.*
        if not any(k.startswith("state_dict.") for k in tensors):
            raise MappingError(f"{ckpt.path}: no state_dict.* tensors: not a NeMo Lightning checkpoint")
        out = RankModels({}, 1, 1, 1, "core")
        model = {k.removeprefix("state_dict."): t for k, t in tensors.items() if k.startswith("state_dict.")}
        for k in tensors:
            if not k.startswith("state_dict."):
                reason = entry_reason(k)
                if reason is None:
                    raise MappingError(f"{ckpt.path}: tensor {k!r} is not part of a NeMo GPT checkpoint")
                out.dropped[k] = reason
        out.shards[(0, 0, 0)] = _split_rank(model, ckpt.path, out, "state_dict.")[0]
        return out
    if not isinstance(ranks, list) or not ranks:
        raise MappingError(f"{ckpt.path}: not a Megatron or NeMo checkpoint ({ckpt.format})")
    tp = int(ckpt.values.get("tensor_parallel", 1))
    pp = int(ckpt.values.get("pipeline_parallel", 1))
    out = RankModels({}, tp, pp, 1, "core")
    by_prefix: dict[str, dict[str, LazyTensor]] = {r["prefix"]: {} for r in ranks}
    for key, t in tensors.items():
        prefix = next((p for p in by_prefix if key.startswith(p)), None)
        if prefix is None:
            raise MappingError(f"{ckpt.path}: tensor {key!r} belongs to no rank")
        by_prefix[prefix][key[len(prefix) :]] = t
    vp = None
    for r in ranks:
        chunks = _split_rank(by_prefix[r["prefix"]], ckpt.path, out, r["prefix"])
        if vp is None:
            vp = len(chunks)
        elif len(chunks) != vp:
            raise CheckpointError(f"{ckpt.path}: rank {r['prefix'] or '0'} holds {len(chunks)} model chunks, not {vp}")
        for v, chunk in enumerate(chunks):
            out.shards[(r["tp"], r["pp"], v)] = chunk
    out.vp = vp or 1
    return out


def _torch_dist(ckpt: Checkpoint) -> RankModels:
    """A megatron-core `torch_dist` checkpoint: global tensors; `decoder.layers.*` stacked [L, ...] are unstacked
    (`DcpTensor.select`), SwiGLU fc1 saved as `_w` (gate) / `_v` (up) halves is re-joined as [gate; up]."""
    out = RankModels({}, 1, 1, 1, "core", stacked=True)
    model: dict[str, LazyTensor] = {}
    halves: dict[str, dict[str, LazyTensor]] = {}
    for key, t in ckpt.tensors.items():
        local = key
        for prefix in ("model.", "module."):
            local = local.removeprefix(prefix)
        if not local.startswith(("decoder.", "embedding.", "output_layer.")):
            reason = entry_reason(key)
            if reason is None:
                raise MappingError(f"{ckpt.path}: tensor {key!r} is not part of a megatron-core GPT checkpoint")
            out.dropped[key] = reason
            continue
        if local.startswith("decoder.layers.") and not _LAYER_KEY.match(local):
            select = getattr(t, "select", None)
            if select is None or not t.shape:
                raise CheckpointError(f"{ckpt.path}: layer-stacked tensor {key!r} cannot be read layer by layer")
            sub = local.removeprefix("decoder.layers.")
            for i in range(t.shape[0]):
                name = f"decoder.layers.{i}.{sub}"
                if m := re.fullmatch(r"(.*\.linear_fc1\.(?:weight|bias))_([wv])", name):
                    halves.setdefault(m.group(1), {})[m.group(2)] = select(i, name)
                else:
                    model[name] = select(i, name)
        else:
            model[local] = t
    for name, parts in halves.items():
        if sorted(parts) != ["v", "w"]:
            raise CheckpointError(f"{ckpt.path}: {name} has only its {'gate' if 'w' in parts else 'up'} half (_w/_v)")
        model[name] = V.concat_rows([parts["w"], parts["v"]], name)
    out.shards[(0, 0, 0)] = _split_rank(model, ckpt.path, out, "", prefixes=("",))[0]
    return out


def merged(models: RankModels, attention: Attention, gated: bool, num_layers: int | None) -> Merged:
    """Global tensors (fused QKV and gated fc1 split) from the canonical rank models."""
    layout = Layout(CORE_TABLE, attention, gated)
    if models.stacked:  # already global; a one-rank merge splits QKV per group and fc1 into [gate; up]
        return merge_model(models.shards, layout, 1, 1, num_layers=num_layers)
    return merge_model(models.shards, layout, models.tp, models.pp, vp_size=models.vp, num_layers=num_layers)


def saved_config(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    """("megatron", args) or ("nemo", cfg): the configuration saved with the checkpoint ({} when none)."""
    values = ckpt.values
    if ckpt.format == "nemo":
        cfg = values.get("model_config")
        return "nemo", dict(cfg) if isinstance(cfg, Mapping) else {}
    if ckpt.format == "torch":
        hp = values.get("hyper_parameters")
        cfg = hp.get("cfg") if isinstance(hp, Mapping) else None
        return "nemo", dict(cfg) if isinstance(cfg, Mapping) else {}
    args = values.get("args")
    return "megatron", dict(args) if isinstance(args, Mapping) else {}
