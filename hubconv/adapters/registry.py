"""Adapter registry: built-in adapters by name, plus plugins from the `hubconv.adapters` entry point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from hubconv.adapters.base import Adapter
from hubconv.errors import HubconvError

# name -> module that defines and registers it; imported on first use to keep start-up lean.
_BUILTIN = {
    "torchtitan": "hubconv.adapters.torchtitan",
    "nanogpt": "hubconv.adapters.nanogpt",
    "mapping": "hubconv.adapters.mapping",
}
_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS[adapter.name] = adapter
    return adapter


def _load_all() -> None:
    for module in _BUILTIN.values():
        importlib.import_module(module)
    for ep in entry_points(group="hubconv.adapters"):
        if ep.name not in _ADAPTERS:
            obj = ep.load()
            register(obj() if isinstance(obj, type) else obj)


def available() -> dict[str, Adapter]:
    _load_all()
    return dict(sorted(_ADAPTERS.items()))


def get(spec: str) -> tuple[Adapter, str | None]:
    """`torchtitan` or `torchtitan:llama3` -> (adapter, family or None)."""
    name, _, family = spec.partition(":")
    if name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _ADAPTERS:
        _load_all()
    if name not in _ADAPTERS:
        raise HubconvError(f"unknown adapter {name!r}; available: {', '.join(available())}")
    adapter = _ADAPTERS[name]
    if family and family not in adapter.families:
        raise HubconvError(f"adapter {name!r} has no model family {family!r}; families: {', '.join(adapter.families)}")
    return adapter, family or None
