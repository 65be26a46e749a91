"""Megatron-LM / NeMo tensor layouts as lazy, streaming views (no Megatron, no torch).

Pure functions over `LazyTensor`s, independent of how the rank files were read:

- Tensor parallel (megatron/core/tensor_parallel/layers.py): column-parallel weights and biases
  are split on dim 0, row-parallel weights on dim 1 (their biases are whole on every rank),
  vocab-parallel embeddings / output layer on dim 0; everything else is replicated and is checked
  equal across ranks, block by block.
- Fused QKV, per rank (each rank holds whole heads or query groups), by `checkpoint_version`
  (megatron/training/checkpointing.py `fix_query_key_value_ordering`): 0 -> rows `[3, np, hn]`;
  1.0 -> `[np, hn, 3]` (q, k, v alternate row by row); >= 2.0 -> per query group
  `[q x (np/ng), k, v]` (attention.py `get_query_key_value_tensors`), which for MHA is `[np, 3, hn]`.
  When there are fewer query groups than ranks (megatron-core allows it) ranks hold plain
  1/TP slices of the global fused tensor, so the split happens after the merge.
- Gated (SwiGLU) `linear_fc1` / `dense_h_to_4h`: each rank holds `[gate_r; up_r]` (mlp.py
  `torch.chunk(x, 2, dim=-1)`).
- Vocabulary padding to a multiple of `make_vocab_size_divisible_by x TP`.
- Pipeline parallel: stage-local layer indices renumbered to global ones.

`merge_model` combines them: `{(tp, pp): {key: tensor}}` -> the global unsharded tensors with
fused QKV and gated fc1 already split into separate keys (see `SPLIT_NAMES`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from hubconv import views as V
from hubconv.errors import CheckpointError, MappingError, ModelArgsError
from hubconv.io.tensor import LazyTensor, row_blocks


class Kind(StrEnum):
    """How one parameter is laid out across tensor-parallel ranks."""

    COLUMN = "column"  # split on dim 0 (weights and biases)
    ROW = "row"  # weights split on dim 1; 1-D biases replicated
    VOCAB = "vocab"  # split on dim 0 (embeddings, output layer)
    REPLICATED = "replicated"  # identical on every rank
    QKV = "qkv"  # fused query/key/value, column-parallel per head / group
    FC1 = "fc1"  # gated MLP input projection [gate_r; up_r] per rank
    DROP = "drop"  # not a parameter (`_extra_state`): accounted for, not converted


# ------------------------------------------------------------------------------- tensor parallel


def check_replicated(shards: Sequence[LazyTensor], name: str, labels: Sequence[str] | None = None) -> LazyTensor:
    """`shards[0]` once every shard is verified bit-identical to it (compared in bounded blocks).

    `labels` name the shards in errors (default: tensor-parallel rank numbers)."""
    labels = list(labels or [f"tensor-parallel rank {r}" for r in range(len(shards))])
    first = shards[0]
    for r, s in enumerate(shards[1:], start=1):
        if s.dtype is not first.dtype or tuple(s.shape) != tuple(first.shape):
            raise MappingError(
                f"{name}: {labels[r]} holds {s.dtype} {list(s.shape)}, {labels[0]} {first.dtype} {list(first.shape)}"
            )
    for lo, hi in row_blocks(tuple(first.shape), first.dtype.itemsize):
        ref = np.ascontiguousarray(first.read_rows(lo, hi)).view(np.uint8)
        for r, s in enumerate(shards[1:], start=1):
            if not np.array_equal(ref, np.ascontiguousarray(s.read_rows(lo, hi)).view(np.uint8)):
                raise MappingError(f"{name}: replicated tensor differs between {labels[0]} and {labels[r]}")
    return first


def merge_tp(shards: Sequence[LazyTensor], kind: Kind, name: str) -> LazyTensor:
    """The global view of one parameter from its per-rank shards (in rank order)."""
    if not shards:
        raise MappingError(f"{name}: no tensor-parallel shards")
    if kind in (Kind.COLUMN, Kind.VOCAB):
        return V.concat_rows(shards, name) if len(shards) > 1 else V.rename(shards[0], name)
    if kind is Kind.ROW:
        if len(shards[0].shape) >= 2:
            return V.concat_columns(shards, name) if len(shards) > 1 else V.rename(shards[0], name)
        return V.rename(check_replicated(shards, name), name)
    if kind is Kind.REPLICATED:
        return V.rename(check_replicated(shards, name), name)
    raise MappingError(f"{name}: layout {kind.value!r} is not a plain tensor-parallel merge")


def shard_tp(t: LazyTensor, kind: Kind, tp: int) -> list[LazyTensor]:
    """Inverse of `merge_tp`: the shard of each of `tp` ranks (replicated tensors repeated)."""
    names = [f"{t.name}[tp{r}]" for r in range(tp)]
    split_cols = kind is Kind.ROW and len(t.shape) >= 2
    if kind is Kind.REPLICATED or (kind is Kind.ROW and not split_cols):
        return [V.rename(t, n) for n in names]
    if kind not in (Kind.COLUMN, Kind.VOCAB, Kind.ROW):
        raise MappingError(f"{t.name}: layout {kind.value!r} is not a plain tensor-parallel split")
    dim = 1 if split_cols else 0
    if not t.shape or t.shape[dim] % tp:
        raise MappingError(f"{t.name}: {list(t.shape)} cannot be split over {tp} ranks on dim {dim}")
    sizes = [t.shape[dim] // tp] * tp
    return list(V.split_columns(t, sizes, names) if split_cols else V.split_rows(t, sizes, names))


# ---------------------------------------------------------------------------------- fused QKV


@dataclass(frozen=True)
class Attention:
    """Global attention sizes and the checkpoint's QKV ordering version.

    A checkpoint without `checkpoint_version` is version 0, as Megatron reads it
    (`state_dict.get('checkpoint_version', 0)`). `num_query_groups` is `num_heads` without GQA.
    """

    num_heads: int
    num_query_groups: int
    head_dim: int
    checkpoint_version: float = 3.0

    def per_rank(self, tp: int, name: str) -> tuple[int, int]:
        """(heads, query groups) on each of `tp` ranks; groups is 0 when ranks split groups."""
        if min(self.num_heads, self.num_query_groups, self.head_dim, tp) <= 0:
            raise ModelArgsError(
                f"{name}: {self.num_heads} heads, {self.num_query_groups} query groups, head size {self.head_dim}, "
                f"{tp} ranks"
            )
        if self.num_heads % tp or self.num_heads % self.num_query_groups:
            raise ModelArgsError(
                f"{name}: {self.num_heads} heads, {self.num_query_groups} query groups cannot be split over {tp} ranks"
            )
        if self.checkpoint_version < 2.0 and self.num_query_groups != self.num_heads:
            raise ModelArgsError(
                f"{name}: checkpoint_version {self.checkpoint_version} predates grouped-query attention "
                f"({self.num_query_groups} query groups for {self.num_heads} heads)"
            )
        if self.num_query_groups % tp:
            if tp % self.num_query_groups or self.checkpoint_version < 2.0:
                raise ModelArgsError(f"{name}: {self.num_query_groups} query groups cannot be split over {tp} ranks")
            return self.num_heads // tp, 0
        return self.num_heads // tp, self.num_query_groups // tp

    def fused_rows(self) -> int:
        return (self.num_heads + 2 * self.num_query_groups) * self.head_dim


def _qkv_parts(att: Attention, heads: int, groups: int) -> tuple[list[int], int]:
    """(rows per group of q, k, v; groups) for one fused tensor of `heads` heads, `groups` groups."""
    hn = att.head_dim
    if att.checkpoint_version == 0:
        return [heads * hn, heads * hn, heads * hn], 1  # [3, np, hn]
    if att.checkpoint_version == 1.0:
        return [1, 1, 1], heads * hn  # [np, hn, 3]
    if att.checkpoint_version < 2.0:
        raise ModelArgsError(f"checkpoint_version {att.checkpoint_version} is not a known Megatron QKV ordering")
    return [heads // groups * hn, hn, hn], groups  # [ng, (np/ng + 2), hn]


def split_qkv(fused: LazyTensor, att: Attention, heads: int, groups: int, names: Sequence[str]) -> list[V.Rows]:
    """q, k, v of one fused QKV weight or bias holding `heads` heads in `groups` query groups."""
    sizes, n = _qkv_parts(att, heads, groups)
    return V.split_groups(fused, sizes, n, names)


def fuse_qkv(q: LazyTensor, k: LazyTensor, v: LazyTensor, att: Attention, heads: int, groups: int, name: str) -> V.Rows:
    """Inverse of `split_qkv`."""
    sizes, n = _qkv_parts(att, heads, groups)
    return V.interleave_groups([q, k, v], sizes, n, name)


def merge_qkv(shards: Sequence[LazyTensor], att: Attention, names: Sequence[str]) -> list[LazyTensor]:
    """Global q, k, v (row views keeping file segments) from per-rank fused QKV weights or biases."""
    tp = len(shards)
    heads, groups = att.per_rank(tp, names[0])
    for r, s in enumerate(shards):
        want = att.fused_rows() // tp
        if not s.shape or s.shape[0] != want:
            raise MappingError(f"{s.name}: tensor-parallel rank {r} has shape {list(s.shape)}, expected {want} rows")
    if groups == 0:  # fewer query groups than ranks: ranks hold slices of the global fused tensor
        whole = V.concat_rows(shards, names[0])
        return list(split_qkv(whole, att, att.num_heads, att.num_query_groups, names))
    per_rank = [split_qkv(s, att, heads, groups, [f"{n}[tp{r}]" for n in names]) for r, s in enumerate(shards)]
    return [V.concat_rows([p[i] for p in per_rank], n) for i, n in enumerate(names)]


def shard_qkv(q: LazyTensor, k: LazyTensor, v: LazyTensor, att: Attention, tp: int, name: str) -> list[LazyTensor]:
    """Inverse of `merge_qkv`: the fused QKV tensor of each of `tp` ranks."""
    heads, groups = att.per_rank(tp, name)
    if groups == 0:
        whole = fuse_qkv(q, k, v, att, att.num_heads, att.num_query_groups, name)
        return list(V.split_rows(whole, [att.fused_rows() // tp] * tp, [f"{name}[tp{r}]" for r in range(tp)]))
    qs = V.split_rows(q, [heads * att.head_dim] * tp, [f"{q.name}[tp{r}]" for r in range(tp)])
    ks = V.split_rows(k, [groups * att.head_dim] * tp, [f"{k.name}[tp{r}]" for r in range(tp)])
    vs = V.split_rows(v, [groups * att.head_dim] * tp, [f"{v.name}[tp{r}]" for r in range(tp)])
    return [fuse_qkv(qs[r], ks[r], vs[r], att, heads, groups, f"{name}[tp{r}]") for r in range(tp)]


# ------------------------------------------------------------------------------- gated fc1


def merge_fc1(shards: Sequence[LazyTensor], names: Sequence[str]) -> list[LazyTensor]:
    """Global gate, up from per-rank `[gate_r; up_r]` fc1 weights or biases."""
    halves = []
    for r, s in enumerate(shards):
        if not s.shape or s.shape[0] % 2:
            raise MappingError(f"{s.name}: tensor-parallel rank {r} has {list(s.shape)} rows, not [gate; up]")
        half = s.shape[0] // 2
        halves.append(V.split_rows(s, [half, half], [f"{n}[tp{r}]" for n in names]))
    return [V.concat_rows([h[i] for h in halves], n) for i, n in enumerate(names)]


def shard_fc1(gate: LazyTensor, up: LazyTensor, tp: int, name: str) -> list[LazyTensor]:
    """Inverse of `merge_fc1`: `[gate_r; up_r]` for each of `tp` ranks."""
    if gate.shape != up.shape or not gate.shape or gate.shape[0] % tp:
        raise MappingError(f"{name}: gate {list(gate.shape)} and up {list(up.shape)} cannot be split over {tp} ranks")
    n = gate.shape[0] // tp
    gs = V.split_rows(gate, [n] * tp, [f"{gate.name}[tp{r}]" for r in range(tp)])
    us = V.split_rows(up, [n] * tp, [f"{up.name}[tp{r}]" for r in range(tp)])
    return [V.concat_rows([gs[r], us[r]], f"{name}[tp{r}]") for r in range(tp)]


# ---------------------------------------------------------------------------- vocab padding


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Megatron's `vocab_size_with_padding`: rounded up to a multiple of divisible_by x TP."""
    if vocab_size <= 0 or make_vocab_size_divisible_by <= 0 or tp <= 0:
        raise ModelArgsError(f"vocab size {vocab_size}, divisible by {make_vocab_size_divisible_by}, TP {tp}")
    multiple = make_vocab_size_divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def trim_vocab(
    t: LazyTensor, vocab_size: int, *, make_vocab_size_divisible_by: int | None = None, tp: int = 1
) -> V.Rows:
    """The first `vocab_size` rows of a padded embedding / output layer (lossy: padding dropped).

    With `make_vocab_size_divisible_by`, the rows must equal Megatron's padded size for `vocab_size`.
    """
    rows = t.shape[0] if t.shape else 0
    if make_vocab_size_divisible_by is not None:
        want = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)
        if rows != want:
            raise ModelArgsError(
                f"{t.name}: {rows} rows, but a vocabulary of {vocab_size} padded to a multiple of "
                f"{make_vocab_size_divisible_by} x {tp} has {want}"
            )
    if not 0 < vocab_size <= rows:
        raise ModelArgsError(f"{t.name}: vocabulary size {vocab_size} does not fit its {rows} rows")
    return V.slice_rows(t, 0, vocab_size)


# --------------------------------------------------------------------------- pipeline parallel

_LAYER = re.compile(r"(?:^|(?<=\.))layers\.(\d+)(?=\.)")


def layer_index(key: str) -> int | None:
    """The (first) `layers.N` index in a key, or None for keys outside the layer stack."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def renumber_layer(key: str, offset: int) -> str:
    """`key` with its `layers.N` index shifted by `offset` (stage-local -> global)."""
    return _LAYER.sub(lambda m: f"layers.{int(m.group(1)) + offset}", key, count=1)


def stage_layer_counts(stages: Sequence[Iterable[str]], names: Sequence[str]) -> list[int]:
    """Layers held by each pipeline stage, from its keys (local indices must be 0..n-1)."""
    counts = []
    for keys, name in zip(stages, names, strict=True):
        idx = {i for k in keys if (i := layer_index(k)) is not None}
        if idx and idx != set(range(max(idx) + 1)):
            missing = sorted(set(range(max(idx) + 1)) - idx)
            raise CheckpointError(f"{name}: layer indices skip {missing}")
        counts.append(len(idx))
    return counts


def megatron_stage_layer_counts(
    num_layers: int, pp: int, *, first: int | None = None, last: int | None = None
) -> list[int]:
    """Layers per stage as Megatron assigns them (`get_transformer_layer_offset`, no virtual stages):
    even, or `num_layers_in_first/last_pipeline_stage` with the rest spread evenly."""
    if pp == 1:
        return [num_layers]
    head, tail = first or 0, last or 0
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - head - tail
    if middle < 0 or (middle_stages and middle % middle_stages) or (not middle_stages and middle):
        raise ModelArgsError(
            f"{num_layers} layers cannot be split over {pp} pipeline stages (first {first}, last {last})"
        )
    each = middle // middle_stages if middle_stages else 0
    counts = [each] * pp
    if first is not None:
        counts[0] = head
    if last is not None:
        counts[-1] = tail
    return counts


# ------------------------------------------------------------------------------ key tables

# (key suffix regex, kind); first match wins. Suffixes match after any prefix (`model.`, `module.`).
CORE_TABLE: tuple[tuple[str, Kind], ...] = (
    (r"_extra_state$", Kind.DROP),
    (r"embedding\.word_embeddings\.weight$", Kind.VOCAB),
    (r"embedding\.position_embeddings\.weight$", Kind.REPLICATED),
    (r"output_layer\.(weight|bias)$", Kind.VOCAB),
    (r"self_attention\.linear_qkv\.(weight|bias)$", Kind.QKV),
    (r"self_attention\.linear_qkv\.layer_norm_(weight|bias)$", Kind.REPLICATED),
    (r"self_attention\.linear_proj\.(weight|bias)$", Kind.ROW),
    (r"self_attention\.[qk]_layernorm\.(weight|bias)$", Kind.REPLICATED),
    (r"mlp\.linear_fc1\.(weight|bias)$", Kind.FC1),
    (r"mlp\.linear_fc1\.layer_norm_(weight|bias)$", Kind.REPLICATED),
    (r"mlp\.linear_fc2\.(weight|bias)$", Kind.ROW),
    (r"(input_layernorm|pre_mlp_layernorm|final_layernorm|final_norm)\.(weight|bias)$", Kind.REPLICATED),
)

LEGACY_TABLE: tuple[tuple[str, Kind], ...] = (
    (r"_extra_state$", Kind.DROP),
    (r"embedding\.word_embeddings\.weight$", Kind.VOCAB),
    (r"embedding\.position_embeddings\.weight$", Kind.REPLICATED),
    (r"(word_embeddings_for_head|output_layer)\.(weight|bias)$", Kind.VOCAB),
    (r"(self_attention|attention)\.query_key_value\.(weight|bias)$", Kind.QKV),
    (r"(self_attention|attention)\.dense\.(weight|bias)$", Kind.ROW),
    (r"mlp\.dense_h_to_4h\.(weight|bias)$", Kind.FC1),
    (r"mlp\.dense_4h_to_h\.(weight|bias)$", Kind.ROW),
    (r"(input_layernorm|post_attention_layernorm|final_layernorm)\.(weight|bias)$", Kind.REPLICATED),
)

# Fused key parts -> the names of their split parts, for both namings.
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("linear_q", "linear_k", "linear_v"),
    "query_key_value": ("query", "key", "value"),
    "linear_fc1": ("linear_fc1_gate", "linear_fc1_up"),
    "dense_h_to_4h": ("dense_h_to_4h_gate", "dense_h_to_4h_up"),
}


def split_keys(key: str) -> list[str]:
    """`...linear_qkv.weight` -> [`...linear_q.weight`, `...linear_k.weight`, `...linear_v.weight`], etc."""
    module, _, param = key.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf not in SPLIT_NAMES:
        raise MappingError(f"{key}: no split naming for {leaf!r}")
    return [f"{parent}.{p}.{param}" if parent else f"{p}.{param}" for p in SPLIT_NAMES[leaf]]


@dataclass(frozen=True)
class Layout:
    """What `merge_model` needs to know: the key table, attention sizes, whether fc1 is gated."""

    table: tuple[tuple[str, Kind], ...]
    attention: Attention
    gated: bool = False

    def kind(self, key: str) -> Kind:
        for pattern, kind in _compiled(self.table):
            if pattern.search(key):
                return Kind.COLUMN if kind is Kind.FC1 and not self.gated else kind
        raise MappingError(f"{key}: not a known Megatron parameter")


@functools.cache
def _compiled(table: tuple[tuple[str, Kind], ...]) -> tuple[tuple[re.Pattern[str], Kind], ...]:
    return tuple((re.compile(r"(?:^|\.)" + p), k) for p, k in table)


@dataclass
class Merged:
    """Global tensors (QKV and gated fc1 split), and the native keys dropped (e.g. `_extra_state`)."""

    tensors: dict[str, LazyTensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def rank_file(tp: int, pp: int, pp_size: int) -> str:
    """Megatron's per-rank folder name (`get_checkpoint_name`): mp_rank_TT or mp_rank_TT_PPP."""
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def merge_model(
    shards: Mapping[tuple[int, ...], Mapping[str, LazyTensor]],
    layout: Layout,
    tp_size: int,
    pp_size: int,
    *,
    vp_size: int = 1,
    num_layers: int | None = None,
) -> Merged:
    """The global unsharded model from `{(tp_rank, pp_stage): {key: tensor}}` (stage-local layer numbers).

    With virtual pipeline stages (`vp_size` > 1, the `model0`, `model1`, ... chunks of each rank file)
    the keys are `(tp_rank, pp_stage, vp_stage)`; chunks hold consecutive layers in (vp, pp) order,
    as in Megatron's `get_transformer_layer_offset`.
    """

    def label(t: int, p: int, v: int) -> str:
        return rank_file(t, p, pp_size) + (f" model{v}" if vp_size > 1 else "")

    def where(c: tuple[int, int]) -> str:
        return f"pipeline stage {c[0]}" + (f" chunk {c[1]}" if vp_size > 1 else "")

    grid = {(t, p, v) for t in range(tp_size) for p in range(pp_size) for v in range(vp_size)}
    norm = {(k[0], k[1], k[2] if len(k) > 2 else 0): d for k, d in shards.items()}
    sizes = f"(tensor parallel {tp_size}, pipeline {pp_size}" + (f", virtual {vp_size})" if vp_size > 1 else ")")
    for t, p, v in sorted(grid - set(norm)):
        raise CheckpointError(f"{label(t, p, v)}: missing {sizes}")
    for t, p, v in sorted(set(norm) - grid):
        raise CheckpointError(f"{label(t, p, v)}: extra rank {sizes}")
    chunks = [(p, v) for v in range(vp_size) for p in range(pp_size)]  # global layer order
    chunk_keys = []
    for p, v in chunks:
        keys = list(norm[(0, p, v)])
        for t in range(1, tp_size):
            diff = sorted(set(keys) ^ set(norm[(t, p, v)]))
            if diff:
                raise CheckpointError(f"{label(t, p, v)}: {diff[0]!r} is in only one of it and {label(0, p, v)}")
        chunk_keys.append(keys)
    counts = stage_layer_counts(chunk_keys, [label(0, p, v) for p, v in chunks])
    if num_layers is not None and sum(counts) != num_layers:
        raise CheckpointError(f"pipeline stages hold {counts} layers, {sum(counts)} in all, expected {num_layers}")
    out = Merged()
    seen_in: dict[str, tuple[int, int]] = {}
    offset = 0
    for (p, v), keys, count in zip(chunks, chunk_keys, counts, strict=True):
        for key in keys:
            ranks = [norm[(t, p, v)][key] for t in range(tp_size)]
            kind = layout.kind(key)
            gkey = renumber_layer(key, offset) if layer_index(key) is not None else key
            if kind is Kind.DROP:
                out.dropped.append(gkey)
                continue
            if kind is Kind.QKV:
                merged = dict(zip(split_keys(gkey), merge_qkv(ranks, layout.attention, split_keys(gkey)), strict=True))
            elif kind is Kind.FC1:
                merged = dict(zip(split_keys(gkey), merge_fc1(ranks, split_keys(gkey)), strict=True))
            else:
                merged = {gkey: merge_tp(ranks, kind, gkey)}
            for k, view in merged.items():
                if k in out.tensors:  # a non-layer tensor held by two stages must be the same tensor
                    check_replicated([out.tensors[k], view], k, [where(seen_in[k]), where((p, v))])
                    continue
                out.tensors[k] = view
                seen_in[k] = (p, v)
        offset += count
    return out


_PARTS = {part: (fused, i) for fused, parts in SPLIT_NAMES.items() for i, part in enumerate(parts)}


def _fused_key(key: str) -> tuple[str, int] | None:
    """(`...linear_qkv.weight`, 1) for `...linear_k.weight`; None for keys that were not split."""
    module, _, param = key.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf not in _PARTS:
        return None
    fused, i = _PARTS[leaf]
    return (f"{parent}.{fused}.{param}" if parent else f"{fused}.{param}"), i


def shard_model(
    tensors: Mapping[str, LazyTensor],
    layout: Layout,
    tp_size: int,
    pp_size: int,
    *,
    stage_layers: Sequence[int] | None = None,
) -> dict[tuple[int, int], dict[str, LazyTensor]]:
    """Inverse of `merge_model` (no virtual stages): global tensors -> `{(tp, pp): {key: shard}}`.

    Split q/k/v and gate/up keys are fused again per rank; layers go to stages by `stage_layers`
    (default: an even split), embeddings to the first stage, everything else outside the layer
    stack (final norm, output layer) to the last.
    """
    groups: dict[str, dict[int, LazyTensor]] = {}
    for key, t in tensors.items():
        fk = _fused_key(key)
        if fk is not None:
            groups.setdefault(fk[0], {})[fk[1]] = t
    n_layers = len({i for k in tensors if (i := layer_index(k)) is not None})
    counts = list(stage_layers or megatron_stage_layer_counts(n_layers, pp_size))
    starts = np.cumsum([0, *counts])
    out: dict[tuple[int, int], dict[str, LazyTensor]] = {(t, p): {} for t in range(tp_size) for p in range(pp_size)}
    done: set[str] = set()
    for key, t in tensors.items():
        fk = _fused_key(key)
        name = fk[0] if fk else key
        if name in done:
            continue
        done.add(name)
        kind = layout.kind(name)
        if fk is not None:
            parts = groups[name]
            if kind is Kind.QKV and sorted(parts) == [0, 1, 2]:
                ranks = shard_qkv(parts[0], parts[1], parts[2], layout.attention, tp_size, name)
            elif kind is Kind.FC1 and sorted(parts) == [0, 1]:
                ranks = shard_fc1(parts[0], parts[1], tp_size, name)
            else:
                raise MappingError(f"{name}: split parts {sorted(parts)} do not make a {kind.value} tensor")
        else:
            ranks = shard_tp(t, kind, tp_size)
        i = layer_index(name)
        if i is not None:
            p = int(np.searchsorted(starts, i, side="right")) - 1
            if not 0 <= p < pp_size:
                raise MappingError(f"{name}: layer {i} is beyond the {int(starts[-1])} layers of {counts}")
            local = renumber_layer(name, -int(starts[p]))
        else:
            p, local = (0 if re.search(r"(?:^|\.)embedding\.", name) else pp_size - 1), name
        for r, shard in enumerate(ranks):
            out[(r, p)][local] = shard
    return out
