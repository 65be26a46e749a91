"""Adapter registry: built-in adapters by name, and plugins named explicitly or installed as entry points.

An `--adapter` spec is one of (the first form that fits wins; nothing else is accepted):

- `NAME[:FAMILY]` — a built-in adapter (`torchtitan`, `torchtitan:llama3`) or an installed plugin: an entry
  point named NAME in the group `hubconv.adapters` whose object is an adapter class (or instance). NAME is
  letters, digits, `_` and `-`: no dot, no slash.
- `PATH.py:CLASS[:FAMILY]` — a plugin file: the part before `.py:` is a file path (`./my_adapter.py:MyAdapter`,
  `plugins/ours.py:Ours:llama`).
- `PACKAGE.MODULE:CLASS[:FAMILY]` — a plugin module importable from `sys.path` / `PYTHONPATH`; the dot
  before the colon is what tells it from `NAME:FAMILY` (a top-level module needs an entry point or a package).

Loading a plugin imports it, which **executes its code** with the user's permissions: hubconv does so only
for the plugin the spec names (and, for `hubconv adapters`, the installed entry points it lists), never
because a checkpoint or a folder contains code. A plugin class must subclass `hubconv.adapters.base.Adapter`
— in practice `hubconv.adapters.generic.RuleAdapter` — and anything else is refused; it then goes through
the same convert path as the built-ins (every tensor accounted for, completeness against the transformers
class before writing, lossy steps recorded). A loaded plugin is also registered under its `name` for the
rest of the process (so `release` finds it again for smoke parity); a name taken by a built-in is refused.
Plugins may add checkpoint formats with `hubconv.io.checkpoint.register_reader` when their module loads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from hubconv.adapters.base import Adapter
from hubconv.errors import HubconvError

GROUP = "hubconv.adapters"

# name -> module that defines and registers it; imported on first use to keep start-up lean.
_BUILTIN = {
    "torchtitan": "hubconv.adapters.torchtitan",
    "nanogpt": "hubconv.adapters.nanogpt",
    "megatron": "hubconv.adapters.megatron",
    "nemo": "hubconv.adapters.megatron",
    "litgpt": "hubconv.adapters.litgpt",
    "mindformers": "hubconv.adapters.mindformers",
    "mapping": "hubconv.adapters.mapping",
}
_ADAPTERS: dict[str, Adapter] = {}
_ORIGINS: dict[str, str] = {}  # adapter name -> where it came from (for `hubconv adapters`)
_BROKEN: dict[str, str] = {}  # entry point name -> why it could not be loaded
_LOADED: dict[tuple[str, str], Adapter] = {}  # (real file path or module, class) -> the plugin instance

_IDENT = r"[A-Za-z_]\w*"
_FAMILY = r"(?::(?P<family>[\w.-]+))?"
_FILE_SPEC = re.compile(rf"^(?P<file>.+\.py):(?P<cls>{_IDENT}){_FAMILY}$")
_MODULE_SPEC = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})+):(?P<cls>{_IDENT}){_FAMILY}$")
_NAME_SPEC = re.compile(rf"^(?P<name>[A-Za-z0-9_-]+){_FAMILY}$")
SPEC_FORMS = "NAME[:FAMILY], PATH.py:CLASS[:FAMILY] or PACKAGE.MODULE:CLASS[:FAMILY]"


@dataclass(frozen=True)
class Listed:
    """One line of `hubconv adapters`: an adapter (or a broken plugin's error) and where it comes from."""

    name: str
    origin: str
    adapter: Adapter | None = None
    error: str | None = None


def register(adapter: Adapter, origin: str | None = None) -> Adapter:
    """Register `adapter` under its `name` (built-in modules call this when imported)."""
    _ADAPTERS[adapter.name] = adapter
    _ORIGINS[adapter.name] = origin or f"built-in ({type(adapter).__module__})"
    return adapter


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _ep_origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"entry point {ep.name} = {ep.value} (distribution {where})"


def _load_entry_point(ep: EntryPoint) -> Adapter:
    """Import one installed plugin; every failure is a one-line HubconvError naming the entry point."""
    what = f"adapter plugin {ep.name!r} ({_ep_origin(ep)})"
    if ep.name in _BUILTIN:
        raise HubconvError(f"{what}: the name {ep.name!r} belongs to a built-in adapter; ignored")
    try:
        obj = ep.load()
    except Exception as e:
        raise HubconvError(f"{what}: importing it failed: {_exc(e)}") from None
    adapter = _check(obj, what) if isinstance(obj, Adapter) else _instantiate(obj, what)
    adapter.name = ep.name  # the entry point's name is how users select it, and what hubconv.json records
    return register(adapter, _ep_origin(ep))


def _load_builtins() -> None:
    for module in _BUILTIN.values():
        importlib.import_module(module)


def available() -> dict[str, Adapter]:
    """Built-in adapters and every installed plugin that loads (broken ones are left out; see `listing`)."""
    listing()
    return dict(sorted(_ADAPTERS.items()))


def listing() -> list[Listed]:
    """Every built-in adapter, installed plugin and plugin loaded in this process, with where it comes from;
    installed plugins are imported to describe them, and one that fails is listed with its error."""
    _load_builtins()
    for name, ep in _entry_points().items():
        if name in _BROKEN or (name in _ADAPTERS and name not in _BUILTIN):
            continue
        try:
            _load_entry_point(ep)
        except HubconvError as e:
            _BROKEN[name] = str(e)
    rows = [Listed(n, _ORIGINS.get(n, "?"), adapter=a) for n, a in _ADAPTERS.items()]
    rows += [Listed(n, "entry point", error=msg) for n, msg in _BROKEN.items()]
    return sorted(rows, key=lambda r: r.name)


def is_plugin_spec(spec: str) -> bool:
    """True for `PATH.py:CLASS[...]` and `PACKAGE.MODULE:CLASS[...]` (code named on the command line)."""
    return not _NAME_SPEC.match(spec) and bool(_FILE_SPEC.match(spec) or _MODULE_SPEC.match(spec))


def get(spec: str) -> tuple[Adapter, str | None]:
    """An `--adapter` spec (see the module docstring) -> (adapter, family or None)."""
    if m := _NAME_SPEC.match(spec):
        adapter = _by_name(m["name"])
    elif m := _FILE_SPEC.match(spec):
        adapter = _from_file(m["file"], m["cls"])
    elif m := _MODULE_SPEC.match(spec):
        adapter = _from_module(m["module"], m["cls"])
    else:
        hint = ""
        if spec.endswith(".py") or "/" in spec.partition(":")[0]:
            hint = " (a plugin file is named with its class: path/to/file.py:ClassName)"
        raise HubconvError(f"--adapter {spec!r} is not {SPEC_FORMS}{hint}")
    family = m["family"]
    if family and family not in adapter.families:
        raise HubconvError(
            f"adapter {adapter.name!r} has no model family {family!r}; families: {', '.join(adapter.families)}"
        )
    return adapter, family or None


def _by_name(name: str) -> Adapter:
    if name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    eps = _entry_points()
    if name in eps:
        return _load_entry_point(eps[name])  # only the plugin named is imported
    _load_builtins()
    names = sorted(set(_ADAPTERS) | set(eps))
    raise HubconvError(
        f"unknown adapter {name!r}; available: {', '.join(names)} "
        "(a plugin is named PATH.py:CLASS or PACKAGE.MODULE:CLASS, or installed as a hubconv.adapters entry point)"
    )


def _from_file(path: str, cls: str) -> Adapter:
    what = f"adapter plugin {path}:{cls}"
    if not os.path.isfile(path):
        raise HubconvError(f"{what}: no such file" if not os.path.exists(path) else f"{what}: not a file")
    real = os.path.realpath(path)
    key = (real, cls)
    if key in _LOADED:
        return _LOADED[key]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0])
    module_name = f"hubconv_plugin_{stem}_{hashlib.sha256(real.encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, real)
        if spec is None or spec.loader is None:
            raise HubconvError(f"{what}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up while it executes
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(module_name, None)
            if not isinstance(e, Exception):
                raise
            raise HubconvError(f"{what}: importing it failed: {_exc(e)}") from None
    return _plugin(module, cls, what, key, f"plugin file {path}")


def _from_module(module_name: str, cls: str) -> Adapter:
    what = f"adapter plugin {module_name}:{cls}"
    key = (module_name, cls)
    if key in _LOADED:
        return _LOADED[key]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise HubconvError(f"{what}: no module named {e.name!r} on the Python path") from None
        raise HubconvError(f"{what}: importing it failed: {_exc(e)}") from None
    except Exception as e:
        raise HubconvError(f"{what}: importing it failed: {_exc(e)}") from None
    return _plugin(module, cls, what, key, f"plugin module {module_name} ({getattr(module, '__file__', '?')})")


def _plugin(module: Any, cls: str, what: str, key: tuple[str, str], origin: str) -> Adapter:
    obj = getattr(module, cls, None)
    if obj is None:
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise HubconvError(f"{what}: no class {cls!r} in it (classes defined there: {', '.join(defined) or 'none'})")
    adapter = _instantiate(obj, what)
    if adapter.name in _BUILTIN:
        raise HubconvError(f"{what}: its name {adapter.name!r} belongs to a built-in adapter; choose another")
    _LOADED[key] = adapter
    return register(adapter, origin)


def _instantiate(obj: Any, what: str) -> Adapter:
    """A new instance of adapter class `obj`, after checking it is one and that it describes itself."""
    if not isinstance(obj, type):
        raise HubconvError(f"{what}: is a {type(obj).__name__}, not a class (subclass hubconv's RuleAdapter)")
    if not issubclass(obj, Adapter):
        raise HubconvError(
            f"{what}: class {obj.__name__} is not a subclass of hubconv.adapters.base.Adapter "
            "(subclass hubconv.adapters.generic.RuleAdapter)"
        )
    try:
        adapter = obj()
    except Exception as e:
        raise HubconvError(f"{what}: creating it failed: {_exc(e)}") from None
    return _check(adapter, what)


def _check(adapter: Adapter, what: str) -> Adapter:
    """`adapter` after checking that it describes itself (name, families, description)."""
    name, families = getattr(adapter, "name", None), getattr(adapter, "families", None)
    if not isinstance(name, str) or not _NAME_SPEC.match(name) or ":" in name:
        raise HubconvError(f"{what}: its `name` must be a word of letters, digits, '_' or '-', not {name!r}")
    if not isinstance(families, tuple | list) or not families or not all(isinstance(f, str) for f in families):
        raise HubconvError(f"{what}: its `families` must be a non-empty tuple of names, not {families!r}")
    if not isinstance(getattr(adapter, "description", None), str):
        raise HubconvError(f"{what}: its `description` must be a string")
    return adapter


def _exc(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
