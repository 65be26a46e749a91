"""The target architecture as transformers defines it: config files and expected parameters.

Importing transformers and torch costs seconds, so `hubconv convert` asks a child process for
it while it streams tensors: the child builds the real config class (writing `config.json` and
`generation_config.json`) and instantiates the model on the meta device to list every parameter
it expects with its shape. The parent checks its plan against that list before publishing the
output folder. The answer depends only on the request and the transformers version, so it is
cached (`$HUBCONV_CACHE_DIR`, default `~/.cache/hubconv`): re-releasing the same architecture
skips the child entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from hubconv import __version__
from hubconv.errors import HubconvError, MappingError

CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass
class TargetSpec:
    params: dict[str, tuple[int, ...]]
    architecture: str
    transformers_version: str
    cached: bool = False


def cache_dir() -> str:
    root = os.environ.get("HUBCONV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hubconv"
    )
    return os.path.join(root, "targets")


def _cache_key(request: dict[str, Any]) -> str | None:
    try:
        tf = version("transformers")
    except PackageNotFoundError:
        return None
    material = {k: v for k, v in request.items() if k != "out_dir"}
    blob = json.dumps([material, tf, __version__], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


class TargetCheck:
    """Config files + expected parameters for a request: from the cache, or from a child process
    started at construction; `result()` waits for it."""

    def __init__(
        self,
        model_type: str,
        config: dict[str, Any],
        generation: dict[str, Any],
        out_dir: str,
        dtype: str,
        *,
        use_cache: bool = True,
    ) -> None:
        self._request = {
            "model_type": model_type,
            "config": config,
            "generation": generation,
            "out_dir": out_dir,
            "dtype": dtype,
        }
        self._proc: subprocess.Popen[str] | None = None
        self._key = _cache_key(self._request) if use_cache else None
        self._hit = self._load_cached()
        if self._hit is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hubconv.hf_target"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(self._request))
            self._proc.stdin.close()
            self._proc.stdin = None  # closed: communicate() must not flush it

    def _path(self) -> str | None:
        return os.path.join(cache_dir(), f"{self._key}.json") if self._key else None

    def _load_cached(self) -> TargetSpec | None:
        path = self._path()
        if not path or not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                entry = json.load(f)
            for name in CONFIG_FILES:
                with open(os.path.join(self._request["out_dir"], name), "w") as f:
                    f.write(entry["files"][name])
            return TargetSpec(
                {k: tuple(v) for k, v in entry["params"].items()}, entry["architecture"], entry["version"], True
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable cache entry: ask transformers again

    def _store(self, data: dict[str, Any]) -> None:
        path = self._path()
        if not path:
            return
        try:
            files = {}
            for name in CONFIG_FILES:
                with open(os.path.join(self._request["out_dir"], name)) as f:
                    files[name] = f.read()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({**data, "files": files}, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written is only slower

    def result(self) -> TargetSpec:
        if self._hit is not None:
            return self._hit
        assert self._proc is not None
        out, err = self._proc.communicate()
        if self._proc.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit code {self._proc.returncode}"
            raise HubconvError(f"transformers rejected the target config: {last}")
        data = json.loads(out)
        self._store(data)
        return TargetSpec({k: tuple(v) for k, v in data["params"].items()}, data["architecture"], data["version"])

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def compare(spec: TargetSpec, produced: dict[str, tuple[int, ...]]) -> None:
    """Every expected parameter produced with its shape, nothing extra; else a MappingError."""
    missing = sorted(set(spec.params) - set(produced))
    extra = sorted(set(produced) - set(spec.params))
    wrong = sorted(k for k in set(spec.params) & set(produced) if spec.params[k] != produced[k])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:10])}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:10])}")
    if wrong:
        problems.append(
            "wrong shape " + ", ".join(f"{k} {list(produced[k])} (expected {list(spec.params[k])})" for k in wrong[:10])
        )
    if problems:
        raise MappingError(f"output does not match {spec.architecture}: " + "; ".join(problems))


def _main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers import __version__ as tf_version

    req = json.load(sys.stdin)
    config = AutoConfig.for_model(req["model_type"], **req["config"])
    config.dtype = req["dtype"]
    config.save_pretrained(req["out_dir"])
    gen = GenerationConfig.from_model_config(config)
    for k, v in req["generation"].items():
        setattr(gen, k, v)
    gen.save_pretrained(req["out_dir"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {name: list(p.shape) for name, p in model.named_parameters()}
    persistent = model.state_dict()
    params.update({name: list(b.shape) for name, b in model.named_buffers() if name in persistent})
    json.dump({"params": params, "architecture": type(model).__name__, "version": tf_version}, sys.stdout)


if __name__ == "__main__":
    _main()
