"""`--adapter mapping --mapping FILE.yml`: a `RuleAdapter` described by a YAML file in the user's repository.

The file names the target architecture (any transformers causal-LM `model_type`), the model
arguments read from the checkpoint (`args:`), the transformers config (`config:`), the rules
from native keys to HF keys built from the shared op registry (`hubconv.ops`), and optionally
the user's own model code for smoke parity (`reference:`). The schema is documented in
`examples/tutorial-gpt/README.md`; in short:

    architecture: gpt2
    args:                                  # evaluated in order, without eval()
      n_embd: shape(token_embedding_table.weight)[1]
      n_layer: count(blocks.{i}.ln1.weight)
    config: {n_embd: n_embd, activation_function: relu}
    rules:
      - from: {q: "blocks.{i}.sa.heads.{h*}.query.weight", k: ..., v: ...}
        to: transformer.h.{i}.attn.c_attn.weight
        ops: [concat_rows, transpose]
      - drop: "blocks.{i}.sa.heads.{h}.tril"
        reason: causal mask buffer
    reference: {code: model.py:GPTLanguageModel, init: {n_embd: n_embd}}

Argument expressions are integer arithmetic (`hubconv.adapters.rules.evaluate`) over earlier
arguments plus four readers of the checkpoint: `shape(KEY)[d]`, `count(PATTERN)` (distinct values
of the pattern's one placeholder), `has(KEY)` and `value(NAME.FIELD)` (a non-tensor entry, such
as a saved args dict). Every error names the file and the rule (`mapping.yml: rules[3]`).

`reference:` imports and runs the named Python file: loading repository code happens only when
the mapping asks for it, and only for the smoke test's reference forward.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hubconv import ops as op_registry
from hubconv import safe_yaml
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Drop, Rule, RuleTable, evaluate
from hubconv.errors import HubconvError, MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

_TOP = {"architecture", "strip_prefix", "args", "config", "layers", "tie", "rules", "reference", "description"}
_RULE = {"from", "to", "ops", "counts"}
_DROP = {"drop", "reason", "optional"}
_REFERENCE = {"code", "init", "state_dict", "positions", "logits"}
_PLACEHOLDER = re.compile(r"\{(\w+)\*?\}")
_SHAPE = re.compile(r"shape\(\s*([^()\s]+)\s*\)\s*\[\s*(-?\d+)\s*\]")
_CALL = re.compile(r"\b(shape|count|has|value)\(\s*([^()\s]*)\s*\)")


class MappingFileError(MappingError):
    """The mapping file itself is wrong (schema, unknown op, bad expression)."""


class _AnyArchitecture(tuple):
    """`families` of the mapping adapter: any transformers model type the mapping names."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and bool(re.fullmatch(r"[a-z0-9_-]+", item))


def _regex(pattern: str) -> re.Pattern[str]:
    """A key pattern (`blocks.{i}.sa.heads.{h*}.key.weight`) as a regex matching any placeholder value."""
    parts = _PLACEHOLDER.split(pattern)
    return re.compile("^" + "".join(r"\d+" if n % 2 else re.escape(p) for n, p in enumerate(parts)) + "$")


@dataclass(frozen=True)
class Reference:
    """The user's model code for smoke parity: `file.py:Class(**init)`, its state dict and how to call it."""

    code: str  # absolute path of the Python file
    class_name: str
    init: dict[str, Any]
    state_dict: str | None = None  # key of the state dict inside the saved object; None: the file is the state dict
    positions: str | None = None  # forward() keyword taking position ids [1, seq]; None: it takes none
    logits: int | str | None = 0  # where the logits are in forward()'s result (tuple index / dict key); None: itself


@dataclass
class MappingSpec:
    path: str
    label: str  # the file name used in messages
    sha256: str
    architecture: str
    args: dict[str, Any]
    config: dict[str, Any]
    layers: str
    strip_prefix: list[str]
    rules: list[tuple[str, Rule]]  # (label, rule)
    drops: list[tuple[str, Drop, str, bool]]  # (label, drop, source pattern, optional)
    tie: tuple[str, str] | None = None
    reference: Reference | None = None
    description: str = ""
    lines: dict[str, int] = field(default_factory=dict)


def _fail(spec_label: str, where: str, message: str) -> MappingFileError:
    return MappingFileError(f"{spec_label}: {where}: {message}")


def _steps(raw: Any, label: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """`[concat_rows, {transpose: {}}, {scale: {factor: n_head, power: -0.5}}]` -> [(op, params)]."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raw = [raw]
    out: list[tuple[str, dict[str, Any]]] = []
    for n, step in enumerate(raw):
        if isinstance(step, str):
            name, params = step, {}
        elif isinstance(step, dict) and len(step) == 1:
            name, params = next(iter(step.items()))
            params = params or {}
            if not isinstance(params, dict):
                raise _fail(label, f"{where}.ops[{n}]", f"parameters of {name!r} must be a mapping, got {params!r}")
        else:
            raise _fail(label, f"{where}.ops[{n}]", f"expected an op name or {{op: {{params}}}}, got {step!r}")
        if name not in op_registry.REGISTRY:
            raise _fail(label, where, f"unknown op {name!r}; known ops: {', '.join(sorted(op_registry.REGISTRY))}")
        unknown = set(params) - set(op_registry.REGISTRY[name].params)
        if unknown:
            raise _fail(label, where, f"op {name}: unknown parameter(s) {', '.join(sorted(map(str, unknown)))}")
        out.append((str(name), dict(params)))
    return out


def _keys(d: Any, allowed: set[str], label: str, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _fail(label, where, f"expected a mapping, got {type(d).__name__}")
    unknown = set(map(str, d)) - allowed
    if unknown:
        known = ", ".join(sorted(allowed))
        raise _fail(label, where, f"unknown field(s) {', '.join(sorted(unknown))} (known: {known})")
    return d


def _parse_rule(raw: Any, label: str, where: str, layers: str) -> tuple[str, Rule] | tuple[str, Drop, str, bool]:
    if isinstance(raw, dict) and "drop" in raw:
        _keys(raw, _DROP, label, where)
        pattern, reason = raw.get("drop"), raw.get("reason")
        if not isinstance(pattern, str) or not pattern:
            raise _fail(label, where, "drop: expected a key pattern")
        if not isinstance(reason, str) or not reason.strip():
            raise _fail(label, where, f"drop {pattern!r} needs a `reason:` (dropped tensors are reported with it)")
        return (f"{label}: {where}", Drop(_regex(pattern).pattern, reason.strip()), pattern, bool(raw.get("optional")))
    _keys(raw, _RULE, label, where)
    src, dst = raw.get("from"), raw.get("to")
    if src is None:
        src = {}
    if isinstance(src, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in src.items()):
            raise _fail(label, where, "from: roles must map names to key patterns")
    elif not isinstance(src, str):
        raise _fail(label, where, f"from: expected a key pattern or {{role: pattern}}, got {src!r}")
    if isinstance(dst, str):
        targets = [dst]
    elif isinstance(dst, list) and dst and all(isinstance(t, str) for t in dst):
        targets = list(dst)
    else:
        raise _fail(label, where, f"to: expected a target key or a list of them, got {dst!r}")
    counts = raw.get("counts") or {}
    if not isinstance(counts, dict):
        raise _fail(label, where, f"counts: expected {{placeholder: argument}}, got {counts!r}")
    if not src:  # synthesized: placeholders range over `counts`, {i} over the layer count by default
        for t in targets:
            for name in _PLACEHOLDER.findall(t):
                counts.setdefault(name, layers)
    rule = Rule(
        src=src,
        dst=targets[0] if isinstance(dst, str) else targets,
        ops=_steps(raw.get("ops"), label, where),
        counts={str(k): v for k, v in counts.items()},
        label=f"{label}: {where}",
    )
    return (f"{label}: {where}", rule)


def load_spec(path: str) -> MappingSpec:
    """Read and validate a mapping file (bounded YAML; errors name the file and the rule)."""
    label = os.path.basename(path)
    if not os.path.isfile(path):
        raise MappingFileError(f"--mapping {path}: no such file")
    text = safe_yaml.read_text(path, "mapping")
    data = safe_yaml.load_text(text, label)
    if not isinstance(data, dict):
        raise MappingFileError(f"{label}: expected a mapping with `architecture:` and `rules:`")
    _keys(data, _TOP, label, "(top level)")
    arch = data.get("architecture")
    if not isinstance(arch, str) or arch not in _AnyArchitecture():
        raise _fail(label, "architecture", f"expected a transformers model type such as gpt2 or llama, got {arch!r}")
    args = data.get("args") or {}
    config = data.get("config") or {}
    for what, d in (("args", args), ("config", config)):
        if not isinstance(d, dict):
            raise _fail(label, what, "expected a mapping")
    layers = data.get("layers", "n_layer")
    prefixes = data.get("strip_prefix") or []
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _fail(label, "rules", "expected a non-empty list of rules")
    rules: list[tuple[str, Rule]] = []
    drops: list[tuple[str, Drop, str, bool]] = []
    for n, raw in enumerate(raw_rules):
        parsed = _parse_rule(raw, label, f"rules[{n}]", str(layers))
        if isinstance(parsed[1], Drop):
            drops.append(parsed)  # type: ignore[arg-type]
        else:
            rules.append(parsed)  # type: ignore[arg-type]
    tie = None
    if data.get("tie") is not None:
        t = _keys(data["tie"], {"embedding", "head"}, label, "tie")
        if not all(isinstance(t.get(k), str) for k in ("embedding", "head")):
            raise _fail(label, "tie", "expected {embedding: KEY, head: KEY}")
        tie = (t["embedding"], t["head"])
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return MappingSpec(
        path=path,
        label=label,
        sha256=digest,
        architecture=arch,
        args=dict(args),
        config=dict(config),
        layers=str(layers),
        strip_prefix=[str(p) for p in prefixes],
        rules=rules,
        drops=drops,
        tie=tie,
        reference=_parse_reference(data.get("reference"), path, label),
        description=str(data.get("description") or ""),
    )


def _parse_reference(raw: Any, path: str, label: str) -> Reference | None:
    if raw is None:
        return None
    r = _keys(raw, _REFERENCE, label, "reference")
    code = r.get("code")
    if not isinstance(code, str) or ":" not in code:
        raise _fail(label, "reference.code", f"expected path/to/model.py:ClassName, got {code!r}")
    file, _, cls = code.rpartition(":")
    full = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), file))
    if not file.endswith(".py") or not cls.isidentifier():
        raise _fail(label, "reference.code", f"expected path/to/model.py:ClassName, got {code!r}")
    init = r.get("init") or {}
    if not isinstance(init, dict):
        raise _fail(label, "reference.init", "expected {constructor argument: value or expression}")
    logits = r.get("logits", 0)
    if logits is not None and not isinstance(logits, int | str):
        raise _fail(label, "reference.logits", f"expected a tuple index, a dict key or null, got {logits!r}")
    for k in ("state_dict", "positions"):
        if r.get(k) is not None and not isinstance(r.get(k), str):
            raise _fail(label, f"reference.{k}", f"expected a name or null, got {r.get(k)!r}")
    return Reference(full, cls, dict(init), r.get("state_dict"), r.get("positions"), logits)


class MappingAdapter(RuleAdapter):
    """The registered `mapping` adapter; `with_mapping(FILE)` returns one configured from that file."""

    name = "mapping"
    description = "declarative YAML mapping (--mapping FILE.yml) from your own model code to any causal LM"
    families: tuple[str, ...] = _AnyArchitecture(("gpt2", "llama", "mistral", "qwen2", "..."))
    model_types = ("any causal LM",)

    def __init__(self, spec: MappingSpec | None = None):
        self.spec = spec
        if spec is not None:
            self.model_type = spec.architecture
            self.layer_count_arg = spec.layers
            self.tied_pair = spec.tie

    def with_mapping(self, path: str) -> MappingAdapter:
        return MappingAdapter(load_spec(path))

    def _spec(self) -> MappingSpec:
        if self.spec is None:
            raise HubconvError("adapter mapping needs a mapping file: pass --mapping FILE.yml")
        return self.spec

    # ---- RuleAdapter hooks -------------------------------------------------------------------
    def detect_family(self, ckpt: Checkpoint) -> str:
        return self._spec().architecture

    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        out: dict[str, LazyTensor] = {}
        for key, t in ckpt.tensors.items():
            for prefix in self._spec().strip_prefix:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            out[key] = t
        return out

    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        spec = self._spec()
        args: dict[str, Any] = dict(user)
        for name, expr in spec.args.items():
            value = self._expression(expr, args, tensors, ckpt, f"args.{name}")
            if name in user and user[name] != value:
                raise ModelArgsError(
                    f"--model-args {name}={user[name]!r} contradicts {spec.label}: args.{name} = {value!r}"
                )
            args[name] = value
        return args

    def _expression(
        self, expr: Any, args: Mapping[str, Any], tensors: Mapping[str, LazyTensor], ckpt: Checkpoint, where: str
    ) -> Any:
        """An `args:` value: a literal, or arithmetic over earlier args and shape()/count()/has()/value()."""
        spec = self._spec()
        if not isinstance(expr, str):
            return expr
        bound: dict[str, Any] = {}

        def name_for(value: Any) -> str:
            key = f"_v{len(bound)}"
            bound[key] = value
            return key

        def shape(m: re.Match[str]) -> str:
            key, dim = m.group(1), int(m.group(2))
            if key not in tensors:
                raise MappingFileError(f"{spec.label}: {where}: no tensor {key!r} in {ckpt.path}")
            shp = tensors[key].shape
            if not -len(shp) <= dim < len(shp):
                raise MappingFileError(f"{spec.label}: {where}: {key!r} has shape {list(shp)}, no dimension {dim}")
            return name_for(int(shp[dim]))

        def call(m: re.Match[str]) -> str:
            fn, arg = m.group(1), m.group(2)
            if fn == "shape":
                raise MappingFileError(f"{spec.label}: {where}: shape({arg}) needs a dimension: shape({arg})[0]")
            if fn == "has":
                return name_for(arg in tensors)
            if fn == "value":
                head, *path = arg.split(".")
                if head not in ckpt.values:
                    raise MappingFileError(f"{spec.label}: {where}: no non-tensor entry {head!r} in {ckpt.path}")
                v: Any = ckpt.values[head]
                for part in path:
                    if not isinstance(v, Mapping) or part not in v:
                        raise MappingFileError(f"{spec.label}: {where}: {ckpt.path} has no value {arg!r}")
                    v = v[part]
                return name_for(v)
            names = _PLACEHOLDER.findall(arg)
            if len(names) != 1:
                raise MappingFileError(f"{spec.label}: {where}: count({arg}) needs exactly one {{placeholder}}")
            rx = re.compile(_regex(arg).pattern.replace(r"\d+", r"(\d+)"))
            seen = {int(m2.group(1)) for k in tensors if (m2 := rx.match(k))}
            if not seen:
                raise MappingFileError(f"{spec.label}: {where}: count({arg}) matches no tensor of {ckpt.path}")
            return name_for(len(seen))

        text = _CALL.sub(call, _SHAPE.sub(shape, expr))
        try:
            return evaluate(text, {**args, **bound}, f"{spec.label}: {where}")
        except MappingError as e:
            raise MappingFileError(str(e).replace(text, expr)) from None

    def table(self, args: Mapping[str, Any]) -> RuleTable:
        spec = self._spec()
        return RuleTable([r for _, r in spec.rules], [d for _, d, _, _ in spec.drops])

    def hf_config(self, args: Mapping[str, Any]) -> dict[str, Any]:
        spec = self._spec()
        cfg: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None}  # never a config class's defaults
        for key, value in spec.config.items():
            cfg[key] = _evaluate_tree(value, args, f"{spec.label}: config.{key}")
        return cfg

    def generation_config(self, args: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.hf_config(args)
        return {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id")}

    def tied(self, args: Mapping[str, Any]) -> bool:
        return bool(self.hf_config(args).get("tie_word_embeddings"))

    def entry_reason(self, entry: str) -> str | None:
        return f"non-tensor value read by {self._spec().label}" if entry in self._spec_values() else None

    def _spec_values(self) -> set[str]:
        """Non-tensor entries the mapping reads with value(...) (the others are errors, as for every adapter)."""
        found = set()
        for expr in self._spec().args.values():
            if isinstance(expr, str):
                found.update(m.group(2).split(".")[0] for m in _CALL.finditer(expr) if m.group(1) == "value")
        return found

    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        spec = self._spec()
        if family != spec.architecture:
            raise MappingFileError(f"{spec.label}: architecture is {spec.architecture}, not {family}")
        self._check_coverage(ckpt)
        plan = super().plan(ckpt, family, user_args)
        plan.notes.append(f"mapping {spec.label} (sha256 {spec.sha256[:12]})")
        return plan

    def _check_coverage(self, ckpt: Checkpoint) -> None:
        """Every rule matches some tensor, and every tensor is matched by a rule or a drop."""
        spec = self._spec()
        tensors = self.model_tensors(ckpt)
        rule_rx = [(label, [_regex(p) for p in rule.roles.values()]) for label, rule in spec.rules]
        drop_rx = [(label, _regex(pattern), optional) for label, _, pattern, optional in spec.drops]
        for label, rxs in rule_rx:
            if rxs and not any(rx.match(k) for rx in rxs for k in tensors):
                rule = next(r for lbl, r in spec.rules if lbl == label)
                raise MappingError(f"{label} (from {', '.join(rule.roles.values())}) matches no tensor of {ckpt.path}")
        for label, rx, optional in drop_rx:
            if not optional and not any(rx.match(k) for k in tensors):
                raise MappingError(f"{label} (drop) matches no tensor of {ckpt.path}; mark it `optional: true`")
        tie_head = spec.tie[1] if spec.tie else None
        for key, t in tensors.items():
            if key == tie_head:
                continue
            if not any(rx.match(key) for _, rxs in rule_rx for rx in rxs) and not any(
                rx.match(key) for _, rx, _ in drop_rx
            ):
                raise MappingError(
                    f"{ckpt.path}: tensor {key} {list(t.shape)} is accounted for by no rule of {spec.label}: map it "
                    f"to a {spec.architecture} key, or drop it with `- drop: {key}` and a `reason:` (then the "
                    "smoke test's parity shows what dropping it costs)"
                )

    # ---- smoke parity ----------------------------------------------------------------------------
    @property
    def reference_takes_positions(self) -> bool:
        """Whether the reference forward honours position ids (else parity runs on positions 0..n-1)."""
        return bool(self.spec and self.spec.reference and self.spec.reference.positions)

    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any | None:
        """Logits of the user's own model class (imported from `reference.code`: this executes that file)."""
        spec = self._spec()
        ref = spec.reference
        if ref is None:
            return None
        import torch

        n = tokens.shape[-1]
        contiguous = positions is None or torch.equal(positions.cpu(), torch.arange(n))
        if not ref.positions and not contiguous:
            raise MappingError(
                f"{spec.label}: reference.positions is not set, so the reference runs at positions 0..{n - 1} only"
            )
        cls = _import_class(ref, spec.label)
        init = {k: _evaluate_tree(v, native_args, f"{spec.label}: reference.init.{k}") for k, v in ref.init.items()}
        try:
            model = cls(**init)
        except Exception as e:
            what = f"{type(e).__name__}: {e}"
            raise MappingError(f"{spec.label}: reference {ref.class_name}(**init) failed: {what}") from None
        prefix = f"{ref.state_dict}." if ref.state_dict else ""
        state = {k[len(prefix) :]: _to_torch(t) for k, t in ckpt.tensors.items() if k.startswith(prefix)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise MappingError(f"{spec.label}: reference {ref.class_name}: {' '.join(first[:3])}") from None
        model = model.float().eval()
        kwargs = {ref.positions: positions[None].to(torch.long)} if ref.positions and positions is not None else {}
        with torch.no_grad():
            out = model(tokens, **kwargs)
        logits = out if ref.logits is None else out[ref.logits]
        return logits.float()


def _to_torch(t: LazyTensor) -> Any:
    import torch

    from hubconv.views import materialize

    raw = materialize(t).copy()
    return torch.from_numpy(raw).view(torch.bfloat16) if t.dtype.name == "BF16" else torch.from_numpy(raw)


def _evaluate_tree(value: Any, args: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _evaluate_tree(v, args, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_evaluate_tree(v, args, f"{where}[{i}]") for i, v in enumerate(value)]
    return evaluate(value, args, where) if isinstance(value, str) else value


def _import_class(ref: Reference, label: str) -> Any:
    """Import the user's model file (executing it) and return the named class."""
    if not os.path.isfile(ref.code):
        raise MappingFileError(f"{label}: reference.code: no such file {ref.code}")
    name = "hubconv_reference_" + hashlib.sha256(ref.code.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, ref.code)
    if module_spec is None or module_spec.loader is None:
        raise MappingFileError(f"{label}: reference.code: cannot import {ref.code}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        what = f"{type(e).__name__}: {e}"
        raise MappingFileError(f"{label}: reference.code: importing {ref.code} failed: {what}") from None
    cls = getattr(module, ref.class_name, None)
    if cls is None:
        raise MappingFileError(f"{label}: reference.code: {ref.code} defines no {ref.class_name}")
    return cls


register(MappingAdapter())
