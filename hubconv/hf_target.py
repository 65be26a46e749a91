"""The target architecture as transformers defines it, computed in a child process.

Importing transformers and torch costs ~3 s, so `hubconv convert` runs this module in a child
process while it streams tensors: the child builds the real config class (writing
`config.json` and `generation_config.json`) and instantiates the model on the meta device to
list every parameter it expects with its shape. The parent checks its plan against that list
before publishing the output folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from hubconv.errors import HubconvError, MappingError


@dataclass
class TargetSpec:
    params: dict[str, tuple[int, ...]]
    architecture: str
    transformers_version: str


class TargetCheck:
    """Handle on the child process. It starts importing at once; `submit()` sends the request and
    `result()` waits for the answer."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hubconv.hf_target", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def submit(self, model_type: str, config: dict[str, Any], generation: dict[str, Any], out_dir: str, dtype: str):
        request = {
            "model_type": model_type,
            "config": config,
            "generation": generation,
            "out_dir": out_dir,
            "dtype": dtype,
        }
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(request))
        except BrokenPipeError:
            pass  # the child died during its imports; result() reports its error
        self._proc.stdin.close()
        self._proc.stdin = None  # closed: communicate() must not flush it

    def result(self) -> TargetSpec:
        out, err = self._proc.communicate()
        if self._proc.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit code {self._proc.returncode}"
            raise HubconvError(f"transformers rejected the target config: {last}")
        data = json.loads(out)
        return TargetSpec({k: tuple(v) for k, v in data["params"].items()}, data["architecture"], data["version"])

    def cancel(self) -> None:
        if self._proc.poll() is None:
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
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers import __version__ as tf_version

    for model_type in sys.argv[1:]:  # import the likely modeling modules while the parent plans
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
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
