"""The named registry of tensor ops that mapping rules are built from.

Python adapters, YAML mappings and plugins all name ops from this one registry, so they build
identical tables. An op turns an ordered list of input views into named output views (`views`),
and either declares its inverse — given the shapes it was applied to — or states why it is lossy
(trimmed rows, synthesized zeros, narrowing casts). Round trips are bit-exact for exact ops;
lossy steps are recorded in `hubconv.json` and on the model card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hubconv import views as V
from hubconv.dtypes import BY_NAME, DType, from_float32, parse_user_dtype, to_float32
from hubconv.errors import MappingError
from hubconv.io.tensor import LazyTensor, rows

Shapes = Sequence[tuple[int, ...]]
Forward = Callable[[Sequence[LazyTensor], Sequence[str], Mapping[str, Any]], list[LazyTensor]]
# (params, input shapes, input dtypes) -> (inverse op name, its params), or a lossy reason string.
Inverse = Callable[[Mapping[str, Any], Shapes, Sequence[DType]], "tuple[str, dict[str, Any]] | str"]


@dataclass(frozen=True)
class Op:
    """A named transform: how many inputs/outputs it takes (None: any), its forward and its inverse."""

    name: str
    forward: Forward
    inverse: Inverse
    n_in: int | None = 1
    n_out: int | None = 1
    params: tuple[str, ...] = ()
    doc: str = ""

    def apply(self, inputs: Sequence[LazyTensor], names: Sequence[str], params: Mapping[str, Any]) -> list[LazyTensor]:
        if self.n_in is not None and len(inputs) != self.n_in:
            raise MappingError(f"op {self.name}: takes {self.n_in} input(s), got {len(inputs)}")
        if self.n_out is not None and len(names) != self.n_out:
            raise MappingError(f"op {self.name}: produces {self.n_out} output(s), {len(names)} named")
        unknown = set(params) - set(self.params)
        if unknown:
            raise MappingError(f"op {self.name}: unknown parameter(s) {', '.join(sorted(unknown))}")
        out = self.forward(inputs, names, params)
        if len(out) != len(names):
            raise MappingError(f"op {self.name}: produced {len(out)} tensors for {len(names)} names")
        return out

    def invert(
        self, params: Mapping[str, Any], shapes: Shapes, dtypes: Sequence[DType]
    ) -> tuple[str, dict[str, Any]] | str:
        """(inverse op, params) undoing this op on inputs of `shapes`, or why it cannot be undone."""
        return self.inverse(params, shapes, dtypes)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in REGISTRY:
        raise MappingError(f"op {op.name!r} is already registered")
    REGISTRY[op.name] = op
    return op


def get(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MappingError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


def _int(params: Mapping[str, Any], key: str, op: str) -> int:
    v = params.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise MappingError(f"op {op}: parameter {key} must be a positive integer, got {v!r}")
    return v


def _ints(params: Mapping[str, Any], key: str, op: str) -> list[int]:
    v = params.get(key)
    if (
        not isinstance(v, list | tuple)
        or not v
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v)
    ):
        raise MappingError(f"op {op}: parameter {key} must be a list of non-negative integers, got {v!r}")
    return list(v)


# ------------------------------------------------------------------------------------- ops


def _copy(inputs, names, params):
    (src,) = inputs
    return [V.rename(src, names[0])]


register(Op("copy", _copy, lambda p, s, d: ("copy", {}), doc="the tensor unchanged, under the target name"))


def _transpose(inputs, names, params):
    return [V.transpose(inputs[0], names[0])]


register(Op("transpose", _transpose, lambda p, s, d: ("transpose", {}), doc="swap the two dims of a 2-D tensor"))


def _rope(inputs, names, params):
    heads = _int(params, "heads", "rope_permute")
    return [V.rope_permute(inputs[0], heads, to_half=bool(params.get("to_half", True)), name=names[0])]


register(
    Op(
        "rope_permute",
        _rope,
        lambda p, s, d: ("rope_permute", {"heads": p["heads"], "to_half": not p.get("to_half", True)}),
        params=("heads", "to_half"),
        doc="interleaved -> rotate-half RoPE rows per head (K: the KV head count); to_half: false undoes it",
    )
)


def _concat_rows(inputs, names, params):
    return [V.concat_rows(inputs, names[0])]


register(
    Op(
        "concat_rows",
        _concat_rows,
        lambda p, s, d: ("split_rows", {"sizes": [rows(x) for x in s]}),
        n_in=None,
        doc="inputs stacked on dim 0 in role order ([q; k; v], column-parallel shards)",
    )
)


def _split_rows(inputs, names, params):
    (src,) = inputs
    if "sizes" in params:
        sizes = _ints(params, "sizes", "split_rows")
    else:
        parts = len(names)
        if rows(src.shape) % parts:
            raise MappingError(f"op split_rows: {src.name!r} has {rows(src.shape)} rows, not divisible by {parts}")
        sizes = [rows(src.shape) // parts] * parts
    return list(V.split_rows(src, sizes, names))


register(
    Op(
        "split_rows",
        _split_rows,
        lambda p, s, d: ("concat_rows", {}),
        n_out=None,
        params=("sizes",),
        doc="dim 0 cut into consecutive parts (`sizes` rows each; equal parts when omitted)",
    )
)


def _groups(params: Mapping[str, Any], op: str) -> int:
    return _int(params, "groups", op)


def _interleave_groups(inputs, names, params):
    g = _groups(params, "interleave_groups")
    per = []
    for t in inputs:
        if rows(t.shape) % g:
            raise MappingError(f"op interleave_groups: {t.name!r} has {rows(t.shape)} rows, not {g} equal groups")
        per.append(rows(t.shape) // g)
    return [V.interleave_groups(inputs, per, g, names[0])]


register(
    Op(
        "interleave_groups",
        _interleave_groups,
        lambda p, s, d: ("split_groups", {"groups": p["groups"], "rows": [rows(x) // p["groups"] for x in s]}),
        n_in=None,
        params=("groups",),
        doc="per-group fusion [a_g0; b_g0; ...; a_g1; b_g1; ...] (QKV per KV group)",
    )
)


def _split_groups(inputs, names, params):
    (src,) = inputs
    g = _groups(params, "split_groups")
    per_group = _ints(params, "rows", "split_groups")
    return list(V.split_groups(src, per_group, g, names))


register(
    Op(
        "split_groups",
        _split_groups,
        lambda p, s, d: ("interleave_groups", {"groups": p["groups"]}),
        n_out=None,
        params=("groups", "rows"),
        doc="undo a per-group fusion: `groups` groups of `rows` rows per output",
    )
)


def _interleave_rows(inputs, names, params):
    return [V.interleave_rows(inputs, names[0])]


register(
    Op(
        "interleave_rows",
        _interleave_rows,
        lambda p, s, d: ("split_groups", {"groups": rows(s[0]), "rows": [1] * len(s)}),
        n_in=None,
        doc="row-by-row alternation [a0; b0; a1; b1; ...] (MindSpore w_gate_hidden)",
    )
)


def _split_interleaved_rows(inputs, names, params):
    (src,) = inputs
    return V.split_interleaved_rows(src, names)


register(
    Op(
        "split_interleaved_rows",
        _split_interleaved_rows,
        lambda p, s, d: ("interleave_rows", {}),
        n_out=None,
        doc="undo a row-by-row alternation: output i takes rows i, i+n, ... (MindSpore w_gate_hidden), read in blocks",
    )
)


def _transpose_groups(inputs, names, params):
    (src,) = inputs
    g, r = _int(params, "groups", "transpose_groups"), _int(params, "rows", "transpose_groups")
    if rows(src.shape) % (g * r):
        raise MappingError(
            f"op transpose_groups: {src.name!r} has {rows(src.shape)} rows, not {g} groups of {r}-row blocks"
        )
    n = rows(src.shape) // (g * r)
    return [
        V.Rows(names[0], [src], [V.Piece(0, (a * n + j) * r, (a * n + j + 1) * r) for j in range(n) for a in range(g)])
    ]


def _transpose_groups_inverse(p, s, d):
    g, r = p.get("groups", 1), p.get("rows", 1)
    return ("transpose_groups", {"groups": max(rows(s[0]) // (g * r), 1), "rows": r})


register(
    Op(
        "transpose_groups",
        _transpose_groups,
        _transpose_groups_inverse,
        params=("groups", "rows"),
        doc="`groups` groups of n blocks of `rows` rows, reordered block-major ([Q; K; V] -> [q0; k0; v0; q1; ...])",
    )
)


def _concat_columns(inputs, names, params):
    return [V.concat_columns(inputs, names[0])]


register(
    Op(
        "concat_columns",
        _concat_columns,
        lambda p, s, d: ("split_columns", {"sizes": [x[1] for x in s]}),
        n_in=None,
        doc="inputs joined on dim 1 (row-parallel shards)",
    )
)


def _split_columns(inputs, names, params):
    return V.split_columns(inputs[0], _ints(params, "sizes", "split_columns"), names)


register(
    Op(
        "split_columns",
        _split_columns,
        lambda p, s, d: ("concat_columns", {}),
        n_out=None,
        params=("sizes",),
        doc="dim 1 cut into parts of `sizes` columns",
    )
)


def _slice_rows(inputs, names, params):
    (src,) = inputs
    start = params.get("start", 0)
    stop = params.get("stop", rows(src.shape))
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= rows(src.shape)):
        raise MappingError(f"op slice_rows: rows {start}..{stop} are outside {src.name!r} ({rows(src.shape)} rows)")
    return [V.slice_rows(src, start, stop, names[0])]


def _slice_rows_inverse(p, s, d):
    start, stop = p.get("start", 0), p.get("stop", rows(s[0]))
    if start == 0 and stop == rows(s[0]):
        return ("copy", {})
    return f"rows outside {start}..{stop} of {rows(s[0])} dropped (e.g. vocabulary padding)"


register(Op("slice_rows", _slice_rows, _slice_rows_inverse, params=("start", "stop"), doc="rows [start, stop) only"))


def _dtype(value: Any, op: str) -> DType:
    d = BY_NAME.get(value) if isinstance(value, str) else None
    d = d or (parse_user_dtype(value) if isinstance(value, str) and value != "auto" else None)
    if d is None:
        raise MappingError(f"op {op}: unknown dtype {value!r}")
    return d


def _zeros(inputs, names, params):
    shape = _ints(params, "shape", "zeros") if params.get("shape") != [] else []
    return [V.Zeros(names[0], _dtype(params.get("dtype", "F32"), "zeros"), tuple(shape))]


register(
    Op(
        "zeros",
        _zeros,
        lambda p, s, d: "synthesized zeros (the source model has no such parameter)",
        n_in=0,
        params=("shape", "dtype"),
        doc="a tensor of zeros the source lacks (bias=False models)",
    )
)


def _cast(inputs, names, params):
    return [V.cast(inputs[0], _dtype(params.get("dtype"), "cast"), names[0])]


def _cast_inverse(p, s, d):
    dst = _dtype(p.get("dtype"), "cast")
    widening = d[0] is dst or (d[0].itemsize < dst.itemsize and dst.is_float and d[0].is_float)
    return ("cast", {"dtype": d[0].name}) if widening else f"cast from {d[0]} to {dst} rounds values"


register(Op("cast", _cast, _cast_inverse, params=("dtype",), doc="convert to `dtype` (round to nearest even)"))


def _scale_value(params: Mapping[str, Any]) -> float:
    factor, power = params.get("factor", 1), params.get("power", 1)
    for key, v in (("factor", factor), ("power", power)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise MappingError(f"op scale: parameter {key} must be a finite number, got {v!r}")
    if factor <= 0:
        raise MappingError(f"op scale: parameter factor must be positive, got {factor!r}")
    return float(factor) ** float(power)


def _scale(inputs, names, params):
    (src,) = inputs
    value = _scale_value(params)
    start, stop = params.get("start", 0), params.get("stop", rows(src.shape))
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= rows(src.shape)):
        raise MappingError(f"op scale: rows {start}..{stop} are outside {src.name!r} ({rows(src.shape)} rows)")
    if src.dtype.name not in ("F32", "BF16", "F16"):
        raise MappingError(f"op scale: {src.name!r} is {src.dtype}: only float32, bfloat16 and float16 scale")
    if start == stop:
        return [V.rename(src, names[0])]

    def fn(raw: np.ndarray) -> np.ndarray:  # the product rounded once to float32, then to the storage dtype
        return from_float32((to_float32(raw, src.dtype).astype(np.float64) * value).astype(np.float32), src.dtype)

    scaled = V.Elementwise(names[0], src, src.dtype, fn)
    if start == 0 and stop == rows(src.shape):
        return [scaled]
    pieces = [V.Piece(0, 0, start), V.Piece(1, start, stop), V.Piece(0, stop, rows(src.shape))]
    return [V.Rows(names[0], [src, scaled], pieces)]


def _scale_inverse(p, s, d):
    value = _scale_value(p)
    if math.frexp(value)[0] == 0.5:  # a power of two: every normal value scales back bit for bit
        return ("scale", {**p, "power": -p.get("power", 1)})
    return f"multiplying by {value:.9g} rounds each value (within half an ulp)"


register(
    Op(
        "scale",
        _scale,
        _scale_inverse,
        params=("factor", "power", "start", "stop"),
        doc="rows [start, stop) multiplied by factor ** power (folds an attention scale into q); exact when that "
        "is a power of two",
    )
)


def _tie(inputs, names, params):
    (src,) = inputs
    return [V.rename(src, n) for n in names]


register(
    Op(
        "tie",
        _tie,
        lambda p, s, d: "tied copies: the inverse keeps one (checked identical)",
        n_out=None,
        doc="one source feeding several targets (tied embeddings and head)",
    )
)


def describe() -> list[tuple[str, str]]:
    """(name, description) of every registered op, for docs and `hubconv adapters --ops`."""
    return [(name, REGISTRY[name].doc) for name in sorted(REGISTRY)]
