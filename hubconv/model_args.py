"""Reading native model hyperparameters from JSON, YAML or TOML files."""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any

import yaml

from hubconv.errors import ModelArgsError


def load_args_file(path: str) -> dict[str, Any]:
    """Parse a JSON, YAML or TOML file into a dict (YAML with safe_load)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ModelArgsError(f"{path}: cannot read model args ({e.strerror})") from None
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            data = tomllib.loads(raw.decode())
        elif ext == ".json":
            data = json.loads(raw)
        else:
            data = yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as e:
        raise ModelArgsError(f"{path}: cannot parse model args: {e}") from None
    if not isinstance(data, dict):
        raise ModelArgsError(f"{path}: model args must be a mapping of field names to values")
    return data
