"""The adapter interface every source framework implements, and the plan it produces.

An adapter turns one framework's checkpoint into a `ConversionPlan`: target tensors (named lazy
views over the source tensors, `hubconv.views`), the source keys and entries it drops with a
reason, and the `transformers` config. Most adapters are a `RuleAdapter`
(`hubconv.adapters.generic`): a rule table from the shared op registry (`hubconv.ops`) plus the
code that resolves model hyperparameters; every exact rule has a recorded inverse, so the same
table maps HF tensors back to the native layout (`from_hf`), which round-trip tests use.

Plugins subclass `Adapter` or, preferably, `RuleAdapter` (see `hubconv.adapters.registry`): they
go through the same convert path as built-ins (every tensor accounted for, completeness against
the transformers class before writing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor


@dataclass
class ConversionPlan:
    """Everything needed to write the HF folder: targets in output order, drops, configs."""

    adapter: str
    family: str
    targets: list[LazyTensor]
    dropped: dict[str, str]
    model_type: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    native_args: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # Targets that are not an exact image of source tensors, with why (trimmed vocabulary rows,
    # synthesized zeros, narrowing casts): recorded in hubconv.json and on the model card.
    lossy: dict[str, str] = field(default_factory=dict)
    # A tokenizer source the adapter found with the checkpoint (nanoGPT's meta.pkl), used when none is given.
    tokenizer: str | None = None
    origins: dict[str, str] = field(default_factory=dict)  # target -> the rule that produced it (for errors)


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
    def to_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str) -> list[LazyTensor]:
        """Native tensors -> HF targets (resolved args)."""

    @abstractmethod
    def from_hf(self, tensors: Mapping[str, LazyTensor], args: Mapping[str, Any], family: str) -> list[LazyTensor]:
        """HF tensors -> native targets: the exact inverse of `to_hf`."""
