"""The target architecture as transformers defines it: config files and expected parameters.

Importing transformers and torch costs seconds, so `hubconv convert` asks a child process for
it while it streams tensors: the child builds the real config class (rendering `config.json` and
`generation_config.json` in a private temporary folder) and instantiates the model on the meta
device to list every parameter it expects with its shape; it returns all of it on stdout, and the
parent writes the two files into its staging folder. The child never writes there, and it dies
with its parent (`PR_SET_PDEATHSIG` on Linux, plus a watchdog on the parent pid), so an
interrupted or killed run leaves nothing running and nothing written behind. The parent checks
its plan against the parameter list before publishing the output folder. The answer depends only
on the request and the transformers version, so it is cached (`$HUBCONV_CACHE_DIR`, default
`~/.cache/hubconv`): re-releasing the same architecture skips the child entirely.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
        self._request = {"model_type": model_type, "config": config, "generation": generation, "dtype": dtype}
        self._out_dir = out_dir
        self._proc: subprocess.Popen[str] | None = None
        self._key = _cache_key(self._request) if use_cache else None
        self._hit = self._load_cached()
        if self._hit is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hubconv.hf_target", str(os.getpid())],
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
            self._write_files(entry["files"])
            return TargetSpec(
                {k: tuple(v) for k, v in entry["params"].items()}, entry["architecture"], entry["version"], True
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable cache entry: ask transformers again

    def _write_files(self, files: dict[str, str]) -> None:
        texts = {name: files[name] for name in CONFIG_FILES}  # KeyError before anything is written
        for name, text in texts.items():
            with open(os.path.join(self._out_dir, name), "w") as f:
                f.write(text)

    def _store(self, data: dict[str, Any]) -> None:
        path = self._path()
        if not path:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
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
        self._write_files(data["files"])
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


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int) -> None:
    """Exit when process `parent` does: the kernel kills this process (Linux `PR_SET_PDEATHSIG`), and a
    watchdog thread checks the parent pid everywhere else. Exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before the prctl call
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="hubconv-parent-watch").start()


def _main() -> None:
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers import __version__ as tf_version

    req = json.load(sys.stdin)
    config = AutoConfig.for_model(req["model_type"], **req["config"])
    config.dtype = req["dtype"]
    gen = GenerationConfig.from_model_config(config)
    for k, v in req["generation"].items():
        setattr(gen, k, v)
    with tempfile.TemporaryDirectory(prefix="hubconv-target-") as tmp:  # private: never the parent's folder
        config.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        files = {}
        for name in CONFIG_FILES:
            with open(os.path.join(tmp, name)) as f:
                files[name] = f.read()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {name: list(p.shape) for name, p in model.named_parameters()}
    persistent = model.state_dict()
    params.update({name: list(b.shape) for name, b in model.named_buffers() if name in persistent})
    answer = {"params": params, "architecture": type(model).__name__, "version": tf_version, "files": files}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    _main()
