"""Paths and a CLI runner shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tiny-llama3-torchtitan")
EXAMPLE_CONFIG = os.path.join(EXAMPLE, ".hubconv.yml")
# The bundled example as conversion flags (adapter, checkpoint, model args).
EXAMPLE_SOURCE = [
    "--adapter", "torchtitan",
    "--checkpoint", os.path.join(EXAMPLE, "step-800"),
    "--model-args", os.path.join(EXAMPLE, "model_args.yaml"),
]  # fmt: skip


def hubconv(*args: str, cwd: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `hubconv` command line in a child process, capturing its output."""
    return subprocess.run([sys.executable, "-m", "hubconv", *args], capture_output=True, text=True, cwd=cwd, env=env)


def segment_bytes(segs: list) -> bytes:
    """The bytes that file segments (hubconv.io.tensor.Segment) point at, concatenated."""
    out = b""
    for s in segs:
        with open(s.path, "rb") as f:
            f.seek(s.offset)
            out += f.read(s.nbytes)
    return out


def single_segment_bytes(t) -> bytes:
    """The bytes of a lazy tensor stored as exactly one file segment."""
    (seg,) = t.segments()
    return segment_bytes([seg])
