"""`RuleAdapter`: the generic planning every rule-based adapter (built-in, YAML mapping or plugin) shares.

A subclass supplies what is specific to its framework — which tensors are the model's
(`model_tensors`: prefixes stripped), how hyperparameters resolve against the shapes
(`resolve_args`), the rule table (`table`), the transformers config (`hf_config`) and why each
non-tensor entry may be dropped (`entry_reason`). The base class does the rest identically for
all of them:

- every source tensor is mapped by a rule or dropped with a stated reason (unknown keys are an
  error naming them), and every non-tensor entry is accounted for;
- tied heads: a head tensor identical to the embeddings is dropped as tied (checked block by
  block), one that differs while the args say tied is an error;
- lossy steps (trimmed rows, synthesized zeros, narrowing casts) are collected into the plan, and
  from there into `hubconv.json` and the model card;
- targets come out in the table's rule order, layer by layer;
- every expected parameter is produced (the rule targets with the layer placeholders filled in),
  with an error in *native* names when a source tensor is missing.

Completeness and shapes against the real transformers class are checked by `convert` before the
first byte is written (`hf_target`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from hubconv.adapters.base import Adapter, ConversionPlan
from hubconv.adapters.rules import Mapped, Rule, RuleTable, evaluate
from hubconv.errors import MappingError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor, row_blocks


def same_data(a: LazyTensor, b: LazyTensor) -> bool:
    """Equal dtype, shape and bytes (compared block by block; identical file segments short-cut)."""
    if a.shape != b.shape or a.dtype is not b.dtype:
        return False
    sa, sb = a.segments(), b.segments()
    if sa is not None and sa == sb:
        return True
    return all(
        np.array_equal(a.read_rows(lo, hi).view(np.uint8), b.read_rows(lo, hi).view(np.uint8))
        for lo, hi in row_blocks(a.shape, a.dtype.itemsize)
    )


class RuleAdapter(Adapter):
    """An adapter defined by a `RuleTable` plus hyperparameter resolution."""

    model_type: str = ""
    layer_count_arg: str = "n_layers"  # the resolved arg that layer placeholders ({i}) range over
    # (embedding key, head key) in native names: the head is dropped as tied when the args say so.
    tied_pair: tuple[str, str] | None = None

    # ---- what subclasses provide ---------------------------------------------------------------
    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        """The checkpoint's tensors under native model names (wrapper prefixes stripped)."""
        return dict(ckpt.tensors)

    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def table(self, args: Mapping[str, Any]) -> RuleTable:
        raise NotImplementedError

    def hf_config(self, args: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def generation_config(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {k: args.get(k) for k in ("bos_token_id", "eos_token_id")}

    def entry_reason(self, entry: str) -> str | None:
        """Why a non-tensor checkpoint entry may be dropped, or None when it is unexpected."""
        return None

    def tied_keys(self, args: Mapping[str, Any]) -> tuple[str, str] | None:
        """(embedding key, head key) in native names for these args (default: `tied_pair`)."""
        return self.tied_pair

    def tied(self, args: Mapping[str, Any]) -> bool:
        return bool(args.get("tie_word_embeddings"))

    # ---- the generic part ------------------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        tensors = self.model_tensors(ckpt)
        args = self.resolve_args(ckpt, tensors, user_args)
        dropped: dict[str, str] = {}
        pair = self.tied_keys(args)
        if pair and self.tied(args):
            emb, head = pair
            if head in tensors:
                if emb not in tensors or not same_data(tensors[head], tensors[emb]):
                    raise MappingError(f"{ckpt.path}: the model is tied, but {head} differs from {emb}")
                dropped[head] = f"tied to {emb} (identical data)"
                tensors = {k: v for k, v in tensors.items() if k != head}
        table = self.table(args)
        targets, table_drops, records = table.apply(tensors, args, where=ckpt.path)
        dropped.update(table_drops)
        for entry in ckpt.entries:
            reason = self.entry_reason(entry)
            if reason is None:
                raise MappingError(f"{ckpt.path}: non-tensor entry {entry!r} matches nothing {self.name} knows")
            dropped[entry] = reason
        self.check_complete(ckpt.path, table, records, args)
        lossy = {t: "; ".join(r.lossy) for r in records if r.lossy for t in r.targets}
        return ConversionPlan(
            adapter=self.name,
            family=family,
            targets=targets,
            dropped=dropped,
            model_type=self.model_type,
            config=self.hf_config(args),
            generation_config=self.generation_config(args),
            native_args=args,
            lossy=lossy,
            origins={t: r.rule.describe() for r in records for t in r.targets},
        )

    def expected_targets(self, table: RuleTable, args: Mapping[str, Any]) -> dict[str, str]:
        """Every target name the table must produce for these args -> the rule that makes it.
        Layer placeholders range over `args[layer_count_arg]` unless the rule names its own count."""
        out: dict[str, str] = {}
        for rule in table.rules:
            for dst in rule.targets:
                names = re.findall(r"\{(\w+)\}", dst)
                combos: list[dict[str, int]] = [{}]
                for var in names:
                    count = rule.counts.get(var, self.layer_count_arg)
                    n = evaluate(count, args, rule.describe())
                    combos = [{**c, var: i} for c in combos for i in range(int(n))]
                for c in combos:
                    out[dst.format(**c)] = _native_names(rule, c) or rule.describe()
        return out

    def check_complete(self, where: str, table: RuleTable, records: list[Mapped], args: Mapping[str, Any]) -> None:
        produced = {t for r in records for t in r.targets}
        expected = self.expected_targets(table, args)
        pair = self.tied_keys(args)
        if pair and self.tied(args):  # a tied model stores no head: its rule's targets are not expected
            expected = {k: v for k, v in expected.items() if v != pair[1]}
        missing = sorted(set(expected) - produced)
        if missing:
            needed = list(dict.fromkeys(expected[m] for m in missing))  # native names, in order, once each
            raise MappingError(
                f"{where}: checkpoint lacks tensors needed by the model: "
                + ", ".join(needed[:8])
                + (f" and {len(needed) - 8} more" if len(needed) > 8 else "")
            )

    def to_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str = "") -> list[Any]:
        targets, _, _ = self.table(args).apply(tensors, args)
        return targets

    def from_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str = "") -> list[Any]:
        """HF tensors -> native ones, through each rule's recorded inverse. The forward mapping is planned on
        a shape-only stand-in of the native checkpoint (`native_shapes`), so no native file is needed."""
        native = self.native_shapes(args)
        table = self.table(args)
        _, _, records = table.apply(native, args, where="native layout")
        return table.invert(tensors, [r for r in records if r.inverse is not None])

    def native_shapes(self, args: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only native tensors for `args` (what `from_hf` plans against); adapters that import implement it."""
        raise MappingError(f"adapter {self.name} cannot describe its native layout from args alone")


def _native_names(rule: Rule, binding: Mapping[str, int]) -> str:
    """The source keys a rule reads for one binding, as the checkpoint names them (gathers shown as `{h*}`)."""
    filled = [
        re.sub(r"\{(\w+)\}", lambda m: str(binding[m.group(1)]) if m.group(1) in binding else m.group(0), p)
        for p in rule.roles.values()
    ]
    return " + ".join(filled)
