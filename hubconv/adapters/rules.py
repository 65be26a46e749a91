"""Mapping rules with named roles, gather placeholders and op chains from the shared registry.

A rule says which source tensors feed which targets and how:

    Rule(src={"q": "blocks.{i}.sa.heads.{h*}.query.weight",
              "k": "blocks.{i}.sa.heads.{h*}.key.weight",
              "v": "blocks.{i}.sa.heads.{h*}.value.weight"},
         dst="transformer.h.{i}.attn.c_attn.weight",
         ops=[("concat_rows", {}), ("transpose", {})],
         counts={"h": "n_head"})

- `{i}` captures an integer that must agree across roles and names the target (one target per
  layer); `{h*}` gathers every index present, in numeric order, into the role's input list, and
  the indices must run 0..n-1 (with `counts`, n must equal that resolved argument).
- Inputs are the roles' tensors in role order; `ops` run in sequence (only the last may have
  several outputs: `dst` is then a list). No ops means a copy. A rule with no `src` synthesizes
  its targets once per value of `counts` (e.g. zero biases per layer).
- Op parameters may be integers or small arithmetic expressions over the resolved model
  arguments (`"n_kv_heads"`, `"3 * n_embd"`), evaluated without `eval`.

`RuleTable.apply` maps every source tensor or drops it with a stated reason (unknown keys are
an error naming them), and records, for every target, the inverse op chain (for `from_hf` and
round trips) or the reason it is lossy (for `hubconv.json` and the card).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hubconv import ops as op_registry
from hubconv.errors import MappingError
from hubconv.io.tensor import LazyTensor

Step = tuple[str, Mapping[str, Any]]
_PLACEHOLDER = re.compile(r"\{(\w+)(\*?)\}")


@dataclass(frozen=True)
class Rule:
    src: Mapping[str, str] | str
    dst: Sequence[str] | str
    ops: Sequence[Step] = ()
    counts: Mapping[str, str | int] = field(default_factory=dict)
    label: str = ""

    @property
    def roles(self) -> dict[str, str]:
        return {"x": self.src} if isinstance(self.src, str) else dict(self.src)

    @property
    def targets(self) -> list[str]:
        return [self.dst] if isinstance(self.dst, str) else list(self.dst)

    def describe(self) -> str:
        return self.label or f"rule {' + '.join(self.roles.values()) or '(synthesized)'} -> {', '.join(self.targets)}"


@dataclass(frozen=True)
class Drop:
    """Source keys matching regex `pattern` are dropped for `reason`."""

    pattern: str
    reason: str


@dataclass
class Mapped:
    """One application of a rule: which source keys produced which targets, and how to go back."""

    rule: Rule
    sources: list[str]
    targets: list[str]
    inverse: list[Step] | None  # op chain from the targets back to the sources; None when lossy
    lossy: list[str]  # why the way back is not exact (empty for exact rules)


def _compile(pattern: str) -> tuple[re.Pattern[str], list[str], list[str]]:
    """Regex for `pattern`, its capture names and its gather names."""
    captures, gathers, rx, pos = [], [], [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        rx.append(re.escape(pattern[pos : m.start()]))
        name, star = m.group(1), m.group(2)
        if star:
            gathers.append(name)
            rx.append(f"(?P<g_{name}>\\d+)")
        elif name in captures:
            rx.append(f"(?P=c_{name})")
        else:
            captures.append(name)
            rx.append(f"(?P<c_{name}>\\d+)")
        pos = m.end()
    rx.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(rx) + "$"), captures, gathers


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def evaluate(expr: Any, args: Mapping[str, Any], where: str) -> Any:
    """Resolve an op parameter: lists recursively, strings as integer arithmetic over `args`."""
    if isinstance(expr, list | tuple):
        return [evaluate(e, args, where) for e in expr]
    if not isinstance(expr, str):
        return expr
    if expr in ("true", "false"):
        return expr == "true"

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in args:
                raise MappingError(f"{where}: {expr!r} names {node.id!r}, which is not a model argument")
            return args[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv | ast.Mod) and right == 0:
                raise MappingError(f"{where}: {expr!r} divides by zero")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise MappingError(f"{where}: {expr!r} is not integer arithmetic over model arguments")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return expr  # a plain string parameter (a dtype name, ...)
    if isinstance(tree.body, ast.Name) and tree.body.id not in args:
        return expr  # a plain word (a dtype name...): the op validates it, naming the parameter
    return ev(tree)


class RuleTable:
    """Rules plus drops; `apply` maps a whole checkpoint and accounts for every tensor."""

    def __init__(self, rules: Sequence[Rule], drops: Sequence[Drop] = ()):
        self.rules, self.drops = list(rules), list(drops)
        self._compiled = []
        for r in self.rules:
            for s in r.targets:
                if "*" in s:
                    raise MappingError(f"{r.describe()}: a target name cannot gather ({s!r})")
            for step, _ in r.ops:
                op_registry.get(step)  # unknown ops are errors when the table is built
            roles = {role: _compile(p) for role, p in r.roles.items()}
            placeholders = {m.group(1) for t in r.targets for m in _PLACEHOLDER.finditer(t)}
            bound = set(r.counts) if not roles else {c for _, cs, _ in roles.values() for c in cs}
            if placeholders - bound:
                raise MappingError(
                    f"{r.describe()}: target placeholder(s) {', '.join(sorted(placeholders - bound))} are not "
                    + ("given a range in counts" if not roles else "captured by the source patterns")
                )
            caps = [set(c) for _, c, _ in roles.values()]
            if caps and any(c != caps[0] for c in caps):
                raise MappingError(f"{r.describe()}: every role must capture the same placeholders")
            self._compiled.append((r, roles))
        self._drops = [(re.compile(d.pattern), d) for d in self.drops]

    def apply(
        self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], *, where: str = "checkpoint"
    ) -> tuple[list[LazyTensor], dict[str, str], list[Mapped]]:
        """(targets, dropped source keys with reasons, one `Mapped` record per rule application)."""
        buckets: dict[tuple[int, tuple[tuple[str, int], ...]], dict[str, dict[tuple[int, ...], str]]] = {}
        dropped: dict[str, str] = {}
        unknown: list[str] = []
        for key in tensors:
            hit = self._match(key)
            if hit is None:
                reason = next((d.reason for rx, d in self._drops if rx.search(key)), None)
                if reason is None:
                    unknown.append(key)
                else:
                    dropped[key] = reason
                continue
            index, role, binding, gather = hit
            slot = buckets.setdefault((index, binding), {}).setdefault(role, {})
            slot[gather] = key
        if unknown:
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise MappingError(
                f"{where}: {len(unknown)} tensor(s) match no mapping rule: {', '.join(unknown[:10])}{more}"
            )
        for index, (rule, roles) in enumerate(self._compiled):
            if not roles:
                for binding in _enumerate(rule, args, where):
                    buckets[(index, binding)] = {}
        targets: list[LazyTensor] = []
        records: list[Mapped] = []
        produced: dict[str, str] = {}
        for (index, binding), found in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            rule, roles = self._compiled[index]
            keys = self._inputs(rule, roles, found, dict(binding), args, where)
            names = [t.format(**dict(binding)) for t in rule.targets]
            for n in names:
                if n in produced:
                    raise MappingError(f"{where}: {produced[n]} and {rule.describe()} both produce {n!r}")
                produced[n] = rule.describe()
            out, inverse, lossy = self._run(rule, [tensors[k] for k in keys], names, args, where)
            targets.extend(out)
            records.append(Mapped(rule, keys, names, inverse, lossy))
        return targets, dropped, records

    def _match(self, key: str) -> tuple[int, str, tuple[tuple[str, int], ...], tuple[int, ...]] | None:
        for index, (_, roles) in enumerate(self._compiled):
            for role, (rx, captures, gathers) in roles.items():
                m = rx.match(key)
                if m:
                    binding = tuple((c, int(m.group(f"c_{c}"))) for c in captures)
                    return index, role, binding, tuple(int(m.group(f"g_{g}")) for g in gathers)
        return None

    def _inputs(
        self,
        rule: Rule,
        roles: Mapping[str, tuple[re.Pattern[str], list[str], list[str]]],
        found: Mapping[str, Mapping[tuple[int, ...], str]],
        binding: Mapping[str, int],
        args: Mapping[str, Any],
        where: str,
    ) -> list[str]:
        """Source keys in role order (gathered indices ascending), checking completeness."""
        keys: list[str] = []
        for role, (_, _, gathers) in roles.items():
            got = found.get(role)
            if not got:
                present = next(iter(next(iter(found.values())).values()))
                wanted = _PLACEHOLDER.sub(
                    lambda m: str(binding[m.group(1)]) if m.group(1) in binding else "{" + m.group(1) + "}",
                    rule.roles[role],
                )
                raise MappingError(f"{where}: {rule.describe()}: {present!r} is present but {wanted!r} is missing")
            if gathers:
                for axis, g in enumerate(gathers):
                    seen = sorted({idx[axis] for idx in got})
                    n = len(seen)
                    if g in rule.counts:
                        n = evaluate(rule.counts[g], args, rule.describe())
                    if seen != list(range(n)):
                        missing = sorted(set(range(n)) - set(seen))
                        raise MappingError(
                            f"{where}: {rule.describe()}: role {role!r} gathers {g}={seen[:8]}"
                            + (f", missing {missing[:8]}" if missing else f", expected 0..{n - 1}")
                        )
                expected = 1
                for axis in range(len(gathers)):
                    expected *= len({idx[axis] for idx in got})
                if len(got) != expected:
                    raise MappingError(f"{where}: {rule.describe()}: role {role!r} has an incomplete set of indices")
                keys.extend(got[idx] for idx in sorted(got))
            else:
                keys.append(got[()])
        return keys

    def _run(
        self, rule: Rule, inputs: list[LazyTensor], names: list[str], args: Mapping[str, Any], where: str
    ) -> tuple[list[LazyTensor], list[Step] | None, list[str]]:
        steps = list(rule.ops) or [("copy", {})]
        current = inputs
        inverse: list[Step] = []
        lossy: list[str] = []
        for n, (name, raw) in enumerate(steps):
            op = op_registry.get(name)
            params = {k: evaluate(v, args, f"{rule.describe()}: op {name} {k}") for k, v in raw.items()}
            last = n == len(steps) - 1
            out_names = names if last else [f"{names[0]} (step {n + 1}: {name})"]
            shapes, dtypes = [t.shape for t in current], [t.dtype for t in current]
            try:
                current = op.apply(current, out_names, params)
            except MappingError as e:
                raise MappingError(f"{where}: {rule.describe()}: {e}") from None
            back = op.invert(params, shapes, dtypes)
            if isinstance(back, str):
                lossy.append(f"{name}: {back}")
            else:
                inverse.insert(0, back)
        return current, (None if lossy else inverse), lossy

    def invert(
        self, tensors: Mapping[str, LazyTensor], records: Sequence[Mapped], *, where: str = "HF tensors"
    ) -> list[LazyTensor]:
        """Apply the recorded inverse chains: target tensors -> the source tensors they came from."""
        out: list[LazyTensor] = []
        for rec in records:
            if rec.inverse is None:
                raise MappingError(
                    f"{where}: {rec.rule.describe()} is lossy ({'; '.join(rec.lossy)}): no exact inverse"
                )
            missing = [t for t in rec.targets if t not in tensors]
            if missing:
                raise MappingError(f"{where}: missing {', '.join(missing)}")
            current = [tensors[t] for t in rec.targets]
            for n, (name, params) in enumerate(rec.inverse):
                last = n == len(rec.inverse) - 1
                out_names = rec.sources if last else [f"{rec.sources[0]} (inverse step {n + 1})"]
                current = op_registry.get(name).apply(current, out_names, params)
            out.extend(current)
        return out


def _enumerate(rule: Rule, args: Mapping[str, Any], where: str) -> list[tuple[tuple[str, int], ...]]:
    """Bindings of a synthesized rule: every combination of its `counts` ranges."""
    combos: list[tuple[tuple[str, int], ...]] = [()]
    for var, count in rule.counts.items():
        n = evaluate(count, args, rule.describe())
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise MappingError(f"{where}: {rule.describe()}: count {var}={count!r} is not a non-negative integer")
        combos = [(*c, (var, i)) for c in combos for i in range(n)]
    return combos
