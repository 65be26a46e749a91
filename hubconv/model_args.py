"""Reading native model hyperparameters from JSON, YAML or TOML files."""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any

from hubconv import safe_yaml
from hubconv.errors import ModelArgsError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_args_file(path: str) -> dict[str, Any]:
    """Parse a JSON, YAML or TOML file (UTF-8, at most `safe_yaml.MAX_BYTES`) into a dict; YAML through
    the bounded safe loader. Every problem is a one-line ModelArgsError naming the file (and line)."""
    try:
        text = safe_yaml.read_text(path, "model args")
    except safe_yaml.YamlFileError as e:
        raise ModelArgsError(str(e)) from None
    try:
        ext = os.path.splitext(path)[1].lower()
        if ext == ".toml":
            data = tomllib.loads(text)
        elif ext == ".json":
            data = json.loads(text, parse_constant=_no_constant)
        else:
            data = safe_yaml.load_text(text, path)
    except safe_yaml.YamlFileError as e:
        where = f"line {e.line}: " if e.line else ""
        raise ModelArgsError(f"{path}: cannot parse model args: {where}{e.detail}") from None
    except json.JSONDecodeError as e:
        raise ModelArgsError(f"{path}: cannot parse model args: line {e.lineno}: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        detail = " ".join(str(e).split()) or "nested too deeply"
        raise ModelArgsError(f"{path}: cannot parse model args: {detail}") from None
    if not isinstance(data, dict):
        raise ModelArgsError(f"{path}: model args must be a mapping of field names to values")
    return data
