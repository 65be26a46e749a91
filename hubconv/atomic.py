"""Folders that appear complete or not at all: build next to the target, then rename into place."""

from __future__ import annotations

import os
import shutil


def staging_dir(output: str, purpose: str) -> str:
    """A sibling of `output` (same filesystem, so the final rename is atomic), unique to this process."""
    target = os.path.abspath(output)
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(target)}.hubconv-{purpose}-{os.getpid()}")


def publish_dir(staging: str, output: str) -> None:
    """Move the finished `staging` folder to `output`, replacing an existing one (callers check --overwrite)."""
    if os.path.exists(output):
        old = f"{staging}-old"
        os.rename(output, old)
        os.rename(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output)
