"""Adapter protocol and declarative mapping tables.

An adapter turns one source framework's checkpoint into a `ConversionPlan`: target tensors
(each produced from one source tensor or a small group), the source keys it drops with a
reason, and the `transformers` config. Most adapters are a `MappingTable` — rules like
`layers.{i}.attention.wq.weight -> model.layers.{i}.self_attn.q_proj.weight (rope permute)` — plus
the code that resolves model hyperparameters. Every rule has an inverse, so the same table
also maps HF tensors back to the native layout (`from_hf`), which the round-trip tests use.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hubconv.errors import MappingError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor
from hubconv.transforms import Target, copy

# An op builds a target from a source tensor, given the target name and the resolved args.
Op = Callable[[LazyTensor, str, Mapping[str, Any]], Target]


def identity(src: LazyTensor, name: str, args: Mapping[str, Any]) -> Target:
    return copy(src, name)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", pattern)
    rx = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{rx}$")


@dataclass(frozen=True)
class Rule:
    """`src` pattern -> `dst` pattern, with `{i}`-style integer placeholders; `op` and its `inverse`."""

    src: str
    dst: str
    op: Op = identity
    inverse: Op = identity

    def reversed(self) -> Rule:
        return Rule(self.dst, self.src, self.inverse, self.op)


@dataclass(frozen=True)
class Drop:
    """Source keys matching regex `pattern` are dropped for `reason`."""

    pattern: str
    reason: str


@dataclass
class MappingTable:
    rules: list[Rule]
    drops: list[Drop] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._compiled = [(_compile(r.src), r) for r in self.rules]
        self._drops = [(re.compile(d.pattern), d) for d in self.drops]

    def inverse(self) -> MappingTable:
        return MappingTable([r.reversed() for r in self.rules])

    def apply(
        self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], *, where: str = "checkpoint"
    ) -> tuple[list[Target], dict[str, str]]:
        """Map every source tensor or drop it with a reason; unknown keys are an error."""
        targets: list[Target] = []
        dropped: dict[str, str] = {}
        unknown: list[str] = []
        produced: dict[str, str] = {}
        for key, tensor in tensors.items():
            for rx, rule in self._compiled:
                m = rx.match(key)
                if m:
                    name = rule.dst.format(**m.groupdict())
                    if name in produced:
                        raise MappingError(f"{where}: {key!r} and {produced[name]!r} both map to {name!r}")
                    produced[name] = key
                    targets.append(rule.op(tensor, name, args))
                    break
            else:
                reason = next((d.reason for rx, d in self._drops if rx.search(key)), None)
                if reason is None:
                    unknown.append(key)
                else:
                    dropped[key] = reason
        if unknown:
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise MappingError(
                f"{where}: {len(unknown)} tensor(s) match no mapping rule: {', '.join(unknown[:10])}{more}"
            )
        return targets, dropped


@dataclass
class ConversionPlan:
    """Everything needed to write the HF folder: targets in output order, drops, configs."""

    adapter: str
    family: str
    targets: list[Target]
    dropped: dict[str, str]
    model_type: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    native_args: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # Targets that are not an exact image of source tensors, with why (trimmed vocabulary rows,
    # synthesized zeros, narrowing casts): recorded in hubconv.json and on the model card.
    lossy: dict[str, str] = field(default_factory=dict)


class Adapter(ABC):
    """A source framework. Subclasses register with `hubconv.adapters.registry.register`."""

    name: str
    description: str
    families: tuple[str, ...]
    model_types: tuple[str, ...]  # transformers model types it produces

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """--model-args value (a file path, or already a mapping) -> native args dict."""
        from hubconv.model_args import load_args_file

        if value is None:
            return {}
        return dict(value) if isinstance(value, Mapping) else load_args_file(value)

    def open(self, path: str) -> Checkpoint:
        """Open the checkpoint `path` names, lazily (adapters whose `--checkpoint` may also name a run folder,
        such as nanoGPT's `out_dir`, resolve it here)."""
        from hubconv.io.checkpoint import open_checkpoint

        return open_checkpoint(path)

    @abstractmethod
    def detect_family(self, ckpt: Checkpoint) -> str:
        """The model family inside this framework (e.g. `llama3`), or a MappingError saying why not."""

    @abstractmethod
    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        """Resolve hyperparameters against the checkpoint and map every tensor."""

    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any | None:
        """Float32 logits of the *native* architecture for `tokens` [batch, seq] at `positions` [seq]
        (default 0..seq-1), streamed from the checkpoint, or None when the adapter offers no reference forward."""
        return None

    @abstractmethod
    def to_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str) -> list[Target]:
        """Native tensors -> HF targets (resolved args)."""

    @abstractmethod
    def from_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str) -> list[Target]:
        """HF tensors -> native targets: the exact inverse of `to_hf`."""
