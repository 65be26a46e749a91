"""--model-args for TorchTitan llama3: every spelling of TorchTitan 0.2 and 0.3, checked for sane values.

TorchTitan 0.2 describes a model with the flat ``TransformerModelArgs`` (``n_heads``, ``rope_theta``,
``rope_scaling_args``...) and selects it in a job TOML (``[model] name = "llama3"``, ``flavor``).
TorchTitan 0.3 nests Python configs: ``Llama3Model.Config(dim, vocab_size, layers=[block configs])``
whose blocks hold ``attention`` (``n_heads``, ``n_kv_heads``, ``head_dim``, ``rope = RoPE.Config(dim,
max_seq_len, theta, scaling="llama", scaling_factor, ...)``) and ``feed_forward`` (``hidden_dim``),
and selects a job with ``--module llama3 --config llama3_debugmodel``. Transformers spells RoPE
scaling ``{rope_type: llama3, factor, ...}``.

`normalize` maps all of these onto one canonical dict in the 0.2 names (plus ``head_dim``,
``ffn_hidden_dim`` and ``rope_dim``, which the adapter checks against the tensor shapes); two
spellings of one field that disagree, unknown fields (with a did-you-mean) and nonsense values are
one-line `ModelArgsError`s. ``_spelling`` in the result maps each canonical field to the name the
user wrote, so later messages quote the user's own words.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hubconv.adapters.torchtitan_flavors import (
    LLAMA3_CONFIG_REGISTRY,
    LLAMA3_DEFAULTS,
    LLAMA3_FLAVORS,
    LLAMA3_ROPE_SCALING_DEFAULTS,
    llama3_registry_name,
)
from hubconv.errors import ModelArgsError
from hubconv.model_args import load_args_file

SPELLING = "_spelling"  # key of the canonical dict: canonical field -> the path the user wrote


@dataclass(frozen=True)
class _Ignored:
    """A field TorchTitan has that does not change the converted model; `allowed` restricts its values."""

    allowed: tuple[Any, ...] | None = None
    why: str = ""


_IGNORE = _Ignored()
_FAMILY = "@family"  # model_name / name / module: must name llama3
_REGISTRY = "@registry"  # flavor / config: a flavor or config-registry name
_SCALING = "@scaling"  # a RoPE scaling mapping (TorchTitan, or transformers' spelling), or null
_ROPE_SEEN = "@rope"  # a 0.3 RoPE.Config mapping was given (its `scaling` defaults to "none")
_SCALING_TYPES = {"llama": True, "llama3": True, "none": False, "default": False}

# RoPE.Config fields (0.3), relative to any `rope` mapping. `rope.*` names go to the scaling assembly.
_ROPE: dict[str, Any] = {
    "dim": "rope_dim",
    "theta": "rope_theta",
    "max_seq_len": "max_seq_len",
    "max_context_length": "max_seq_len",  # main after 0.3
    "scaling": "rope.scaling",
    **{k: f"rope.{k}" for k in LLAMA3_ROPE_SCALING_DEFAULTS},
    "backend": _Ignored(("complex",), "llama3 applies RoPE to complex (interleaved) pairs"),
    **{k: _IGNORE for k in ("rope_factor", "beta_fast", "beta_slow", "original_seq_len", "truncate")},  # yarn only
}
# One transformer block config (0.3 `layers[i]`, early-0.3 `layer`).
_BLOCK: dict[str, Any] = {
    "attention.n_heads": "n_heads",
    "attention.n_kv_heads": "n_kv_heads",
    "attention.head_dim": "head_dim",
    "attention.dim": "dim",
    **{f"attention.rope.{k}": v for k, v in _ROPE.items()},
    "attention.qk_norm": _Ignored((None,), "llama3 has no q/k norm"),
    "attention.attn_backend": _IGNORE,
    "attention.attn_mask_type": _IGNORE,
    "attention.rope_backend": _Ignored(("complex",), "llama3 applies RoPE to complex (interleaved) pairs"),
    "feed_forward.hidden_dim": "ffn_hidden_dim",
    "feed_forward.bias": _Ignored((False,), "llama3's FFN has no bias"),
    "feed_forward.w1.in_features": "dim",
    "feed_forward.w1.out_features": "ffn_hidden_dim",
    "feed_forward.w3.in_features": "dim",
    "feed_forward.w3.out_features": "ffn_hidden_dim",
    "feed_forward.w2.in_features": "ffn_hidden_dim",
    "feed_forward.w2.out_features": "dim",
    "attention_norm.normalized_shape": "dim",
    "attention_norm.eps": "norm_eps",
    "ffn_norm.normalized_shape": "dim",
    "ffn_norm.eps": "norm_eps",
    "norm_eps": "norm_eps",
    "depth_init": _IGNORE,
    "moe": _Ignored((None,), "MoE layers are not supported"),
}
# Every accepted path (lists of blocks as `layers.*`) -> canonical field, or a marker.
_PATHS: dict[str, Any] = {
    **{k: k for k in LLAMA3_DEFAULTS if k != "rope_scaling_args"},
    **{k: k for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim", "ffn_hidden_dim")},
    "rope_scaling_args": _SCALING,
    "rope_scaling": _SCALING,
    "rope_parameters": _SCALING,  # transformers 5
    "hidden_dim": "ffn_hidden_dim",
    "theta": "rope_theta",
    "max_context_length": "max_seq_len",
    "model_name": _FAMILY,
    "name": _FAMILY,
    "module": _FAMILY,
    "flavor": _REGISTRY,
    "config": _REGISTRY,
    **{f"rope.{k}": v for k, v in _ROPE.items()},
    **{f"layer.{k}": v for k, v in _BLOCK.items()},
    **{f"layers.*.{k}": v for k, v in _BLOCK.items()},
    "norm.normalized_shape": "dim",
    "norm.eps": "norm_eps",
    "tok_embeddings.num_embeddings": "vocab_size",
    "tok_embeddings.embedding_dim": "dim",
    "lm_head.in_features": "dim",
    "lm_head.out_features": "vocab_size",
}
_CONTAINERS = {p.rsplit(".", i)[0] for p in _PATHS for i in range(1, p.count(".") + 1)}
# Keys of a RoPE scaling mapping, TorchTitan's and transformers' spellings.
_SCALING_KEYS = {
    **{k: k for k in LLAMA3_ROPE_SCALING_DEFAULTS},
    "factor": "scaling_factor",
    "type": "type",
    "rope_type": "type",
    "rope_theta": "rope_theta",
}

_POS_INT = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "head_dim")
_POS_INT += ("ffn_hidden_dim", "rope_dim")
_POS_FLOAT = ("norm_eps", "rope_theta", "ffn_dim_multiplier")
_BOOL = ("enable_weight_tying", "tie_word_embeddings", "depth_init")
_STR = ("attn_type", "attn_mask_type")
_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def load(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--model-args value (a mapping, a JSON/YAML file, a TorchTitan job TOML, or a flavor / registry
    name) -> canonical args (see the module docstring)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return normalize(value, "--model-args")
    if os.path.isfile(value):
        return normalize(load_args_file(value), value)
    if llama3_registry_name(value) is not None:
        return normalize({"config": value}, "--model-args")
    raise ModelArgsError(
        f"--model-args {value!r}: no such file, and not a TorchTitan llama3 flavor ({', '.join(LLAMA3_FLAVORS)}) "
        f"or config name (llama3_debugmodel, llama3_8b, ...){_did_you_mean(value, _registry_names())}"
    )


def normalize(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Any accepted spelling -> canonical args, flavor defaults filled in, values validated."""
    if isinstance(raw.get("model"), Mapping):  # a TorchTitan 0.2 job TOML: [model] name/flavor, [training] seq_len
        raw = _job_fields(raw, source)
    found: dict[str, list[tuple[str, Any]]] = {}
    unknown: list[str] = []
    _collect(raw, "", found, unknown, source)
    if unknown:
        hints = [_suggest_path(u) for u in unknown]
        listing = "" if all(hints) else " (known: " + ", ".join(sorted(k for k in _PATHS if "." not in k)) + ")"
        raise ModelArgsError(
            f"{source}: unknown field(s) " + "; ".join(u + h for u, h in zip(unknown, hints, strict=True)) + listing
        )
    for path, value in found.pop(_FAMILY, []):
        if not isinstance(value, str) or value.rsplit(".", 1)[-1] not in ("llama3", "llama3_ft"):
            raise ModelArgsError(f"{source}: {path} = {value!r} is not a TorchTitan llama3 model")
    rope_paths = found.pop(_ROPE_SEEN, [])
    args: dict[str, Any] = {}
    spelling: dict[str, str] = {}
    for field, candidates in found.items():
        path, value = candidates[0]
        for other_path, other in candidates[1:]:
            if other != value:
                raise ModelArgsError(f"{source}: {path}={value!r} and {other_path}={other!r} disagree")
        if value is None and field != _SCALING:
            continue  # null: not stated
        args[field], spelling[field] = value, path
    if _SCALING in args or rope_paths:
        _assemble_scaling(args, spelling, rope_paths[0][0] if rope_paths else "", source)
    if _REGISTRY in args:
        args = _with_flavor(args, spelling, source)
    _validate(args, spelling, source)
    args[SPELLING] = spelling
    return args


def _job_fields(job: Mapping[str, Any], source: str) -> dict[str, Any]:
    model, training = job["model"], job.get("training") or {}
    if "flavor" not in model:
        raise ModelArgsError(f"{source}: [model] has no flavor (a TorchTitan job TOML names one, e.g. debugmodel)")
    out = {"name": model.get("name", "llama3"), "flavor": model["flavor"]}
    if isinstance(training, Mapping):
        seq = training.get("seq_len", training.get("max_context_length"))
        if seq is not None:
            out["max_seq_len"] = seq
    return out


def _collect(node: Mapping[str, Any], prefix: str, found: dict, unknown: list[str], source: str) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        pattern = re.sub(r"^layers\.\d+\.", "layers.*.", path)
        target = _PATHS.get(pattern)
        if target is None and path == "layers":
            if not isinstance(value, list) or not all(isinstance(b, Mapping) for b in value) or not value:
                raise ModelArgsError(
                    f"{source}: layers must be a non-empty list of TorchTitan block configs (for a count, use n_layers)"
                )
            found.setdefault("n_layers", []).append(("layers (list length)", len(value)))
            for i, block in enumerate(value):
                _collect(block, f"layers.{i}.", found, unknown, source)
        elif target is None and pattern in _CONTAINERS:
            if not isinstance(value, Mapping):
                raise ModelArgsError(f"{source}: {path} must be a mapping, not {type(value).__name__}")
            if pattern.endswith("rope"):
                found.setdefault(_ROPE_SEEN, []).append((path, True))
            _collect(value, f"{path}.", found, unknown, source)
        elif target is None:
            unknown.append(path)
        elif isinstance(target, _Ignored):
            if target.allowed is not None and value not in target.allowed:
                allowed = " or ".join(repr(a) for a in target.allowed)
                raise ModelArgsError(f"{source}: {path}={value!r} is not supported ({target.why}; expected {allowed})")
        else:
            found.setdefault(target, []).append((path, value))


def _assemble_scaling(args: dict[str, Any], spelling: dict[str, str], rope_path: str, source: str) -> None:
    """`rope_scaling_args` from a scaling mapping (any spelling) and/or 0.3's `rope.scaling` fields."""
    stated: dict[str, tuple[str, Any]] = {}  # TorchTitan scaling key -> (path, value)
    scaled: tuple[str, bool] | None = None  # (path, whether llama scaling applies)
    if _SCALING in args:
        path, mapping = spelling.pop(_SCALING), args.pop(_SCALING)
        if mapping is None:
            scaled = (path, False)
        elif not isinstance(mapping, Mapping):
            raise ModelArgsError(f"{source}: {path} must be a mapping of RoPE scaling fields or null")
        else:
            for key, value in mapping.items():
                if key not in _SCALING_KEYS:
                    raise ModelArgsError(
                        f"{source}: {path}: unknown field {key}{_did_you_mean(key, list(_SCALING_KEYS))}"
                    )
                canon = _SCALING_KEYS[key]
                if canon == "type":
                    scaled = (f"{path}.{key}", _scaling_type(value, f"{path}.{key}", source))
                elif canon == "rope_theta":
                    _agree(args, spelling, "rope_theta", f"{path}.{key}", value, source)
                else:
                    if canon in stated and stated[canon][1] != value:
                        raise ModelArgsError(
                            f"{source}: {stated[canon][0]}={stated[canon][1]!r} and {path}.{key}={value!r} disagree"
                        )
                    stated[canon] = (f"{path}.{key}", value)
            if scaled is None:
                scaled = (path, True)  # a RoPEScalingArgs mapping (0.2) means llama scaling
    if "rope.scaling" in args:
        path, value = spelling.pop("rope.scaling"), args.pop("rope.scaling")
        flag = _scaling_type(value, path, source)
        if scaled is not None and scaled[1] != flag:
            raise ModelArgsError(f"{source}: {scaled[0]} and {path}={value!r} disagree about RoPE scaling")
        scaled = (path, flag)
    for key in LLAMA3_ROPE_SCALING_DEFAULTS:
        if f"rope.{key}" in args:
            path, value = spelling.pop(f"rope.{key}"), args.pop(f"rope.{key}")
            if key in stated and stated[key][1] != value:
                raise ModelArgsError(f"{source}: {stated[key][0]}={stated[key][1]!r} and {path}={value!r} disagree")
            stated[key] = (path, value)
    if scaled is None:  # a 0.3 RoPE.Config without `scaling`: its default is "none"
        scaled = (f"{rope_path}.scaling", False)
        if stated:
            path = next(iter(stated.values()))[0]
            raise ModelArgsError(
                f"{source}: {path} has no effect without {rope_path}.scaling: llama (RoPE.Config defaults to none)"
            )
    if scaled[1]:
        args["rope_scaling_args"] = {**LLAMA3_ROPE_SCALING_DEFAULTS, **{k: v for k, (_, v) in stated.items()}}
        spelling["rope_scaling_args"] = scaled[0]
        for key, (path, _) in stated.items():
            spelling[f"rope_scaling_args.{key}"] = path
    else:
        args["rope_scaling_args"] = None
        spelling["rope_scaling_args"] = scaled[0]


def _scaling_type(value: Any, path: str, source: str) -> bool:
    if value not in _SCALING_TYPES:
        what = "yarn RoPE scaling is not supported for llama3" if value == "yarn" else "unknown RoPE scaling"
        raise ModelArgsError(f"{source}: {path}={value!r}: {what} (expected one of {', '.join(_SCALING_TYPES)})")
    return _SCALING_TYPES[value]


def _agree(args: dict[str, Any], spelling: dict[str, str], field: str, path: str, value: Any, source: str) -> None:
    if field in args and args[field] != value:
        raise ModelArgsError(f"{source}: {spelling[field]}={args[field]!r} and {path}={value!r} disagree")
    args.setdefault(field, value)
    spelling.setdefault(field, path)


def _with_flavor(args: dict[str, Any], spelling: dict[str, str], source: str) -> dict[str, Any]:
    """Fill in a flavor's (or 0.3 config's) values under the fields the user stated."""
    path, name = spelling.pop(_REGISTRY), args.pop(_REGISTRY)
    hit = llama3_registry_name(name) if isinstance(name, str) else None
    if hit is None:
        raise ModelArgsError(
            f"{source}: {path} {name!r} is unknown; known: {', '.join(LLAMA3_FLAVORS)} and their 0.3 config names "
            f"(llama3_debugmodel, llama3_8b, ...){_did_you_mean(str(name), _registry_names())}"
        )
    flavor, seq_len = hit
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in LLAMA3_DEFAULTS.items()}
    base.update(LLAMA3_FLAVORS[flavor])
    if seq_len is not None:
        base["max_seq_len"] = seq_len
    base = {k: v for k, v in base.items() if v is not None}
    return {**base, **args, "flavor": flavor}


def _validate(args: dict[str, Any], spelling: dict[str, str], source: str) -> None:
    """Types and ranges of every canonical field, and the relations between head counts."""

    def name(field: str) -> str:
        return spelling.get(field, field)

    def bad(field: str, value: Any, what: str) -> ModelArgsError:
        return ModelArgsError(f"{source}: {name(field)}={value!r} {what}")

    for field in _POS_INT:
        value = args.get(field)
        if value is not None and (not _is_int(value) or value <= 0):
            raise bad(field, value, "must be a positive integer")
    vocab = args.get("vocab_size")
    if vocab is not None and (not _is_int(vocab) or (vocab <= 0 and vocab != -1)):
        raise bad("vocab_size", vocab, "must be a positive integer (or -1: taken from the checkpoint)")
    for field in ("bos_token_id", "eos_token_id", "eos_id"):
        value = args.get(field)
        if value is not None and (not _is_int(value) or value < 0):
            raise bad(field, value, "must be a non-negative integer token id")
    for field in _POS_FLOAT:
        if args.get(field) is not None:
            args[field] = _positive_float(args[field], lambda what, f=field: bad(f, args[f], what))
    for field in _BOOL:
        if args.get(field) is not None and not isinstance(args[field], bool):
            raise bad(field, args[field], "must be true or false")
    for field in _STR:
        if args.get(field) is not None and not isinstance(args[field], str):
            raise bad(field, args[field], "must be a string")
    scaling = args.get("rope_scaling_args")
    if scaling is not None:
        for key in ("scaling_factor", "low_freq_factor", "high_freq_factor"):
            field = f"rope_scaling_args.{key}"
            scaling[key] = _positive_float(scaling[key], lambda what, k=key, f=field: bad(f, scaling[k], what))
        orig = scaling["original_max_position_embeddings"]
        if not _is_int(orig) or orig <= 0:
            raise bad("rope_scaling_args.original_max_position_embeddings", orig, "must be a positive integer")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise bad(
                "rope_scaling_args.high_freq_factor",
                scaling["high_freq_factor"],
                f"must be greater than low_freq_factor={scaling['low_freq_factor']!r}",
            )
    n_heads, n_kv, dim = args.get("n_heads"), args.get("n_kv_heads"), args.get("dim")
    if n_heads is not None and n_kv is not None and n_heads % n_kv:
        raise ModelArgsError(
            f"{source}: {name('n_kv_heads')}={n_kv} does not divide {name('n_heads')}={n_heads} "
            "(each KV head serves a whole group of query heads)"
        )
    if n_heads is not None and dim is not None and "head_dim" not in args and "rope_dim" not in args and dim % n_heads:
        raise ModelArgsError(f"{source}: {name('n_heads')}={n_heads} does not divide {name('dim')}={dim}")
    for field in ("head_dim", "rope_dim"):
        if args.get(field) is not None and args[field] % 2:
            raise bad(field, args[field], "must be even (RoPE rotates pairs of channels)")
    if args.get("head_dim") is not None and args.get("rope_dim") is not None and args["head_dim"] != args["rope_dim"]:
        raise ModelArgsError(
            f"{source}: {name('rope_dim')}={args['rope_dim']} differs from {name('head_dim')}={args['head_dim']} "
            "(llama3's RoPE rotates whole heads)"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_float(value: Any, bad: Any) -> float:
    """A positive finite number; a string that is a float literal counts (YAML 1.1 reads `1e-5` as a string)."""
    if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad("must be a number")
    if not math.isfinite(value) or value <= 0:
        raise bad("must be a positive finite number")
    return float(value)


def _registry_names() -> list[str]:
    return [*LLAMA3_FLAVORS, *LLAMA3_CONFIG_REGISTRY, *(f"llama3_{f.lower()}" for f in LLAMA3_FLAVORS)]


def _suggest_path(path: str) -> str:
    """Did-you-mean for an unknown field, among the accepted names at the same nesting."""
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    pattern = re.sub(r"^layers\.\d+\.", "layers.*.", parent)
    names = {p[len(pattern) :] for p in (*_PATHS, *_CONTAINERS) if p.startswith(pattern)}
    close = difflib.get_close_matches(path[len(parent) :], [n for n in names if "." not in n], n=1, cutoff=0.6)
    return f" (did you mean {parent + close[0]!r}?)" if close else ""


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
