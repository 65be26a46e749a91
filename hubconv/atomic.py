"""Folders that appear complete or not at all: build next to the target, then rename into place.

A staging folder is named `.<output>.hubconv-<purpose>-<pid>`, so a run killed with SIGKILL (no
cleanup possible) leaves a folder whose owner can be told dead; the next run towards the same output
removes it (`remove_stale_staging`). `prepare_output` refuses outputs that would delete or write
into an input before anything is touched.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping

from hubconv.errors import OutputError

_STAGING_PID = re.compile(r"\.hubconv-[a-z]+-(\d+)")


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


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_inputs_kept(output: str, inputs: Mapping[str, str | None]) -> None:
    """OutputError unless `output` (symlinks resolved) is disjoint from every local input path: replacing
    it must not delete an input, nor may it be written inside one. `inputs`: label -> path (URLs,
    flavor names and other non-paths are skipped)."""
    out = os.path.realpath(output)
    for label, path in inputs.items():
        if not path or "://" in path or not os.path.lexists(path):
            continue
        source = os.path.realpath(path)
        if _within(source, out):
            what = "is" if source == out else "contains"
            raise OutputError(f"{output}: the output {what} the {label} {path}; choose another output folder")
        if _within(out, source):
            raise OutputError(f"{output}: the output lies inside the {label} {path}; choose another output folder")


def _check_creatable(output: str) -> None:
    """OutputError when `output`'s parent folder cannot exist (a file is in the way)."""
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{output}: cannot create the output folder: {parent} is a file, not a folder")


def prepare_output(output: str, overwrite: bool, inputs: Mapping[str, str | None]) -> None:
    """Everything checked before a run writes anything to `output`; stale staging folders of dead runs
    next to it are removed."""
    check_inputs_kept(output, inputs)
    if os.path.lexists(output):
        if not overwrite:
            raise OutputError(f"{output}: already exists (pass --overwrite to replace it)")
        if not os.path.isdir(output) or os.path.islink(output):
            raise OutputError(f"{output}: exists and is not a folder; --overwrite only replaces folders")
    _check_creatable(output)
    remove_stale_staging(output)


def _pid_alive(pid: int) -> bool:
    """True unless process `pid` is certainly gone (or a zombie); unknown counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or no such pid to ask about: leave its folders alone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_staging(output: str) -> list[str]:
    """Staging folders next to `output` (also nested ones, `..<output>.hubconv-release-<pid>.hubconv-tmp-<pid>`)
    whose every owner pid is dead. The pids are from this machine's pid namespace: a run sharing the
    folder from another container is not seen, which is why only folders of this output are considered."""
    target = os.path.abspath(output)
    parent, base = os.path.dirname(target), os.path.basename(target)
    pattern = re.compile(r"\.{1,2}" + re.escape(base) + r"((?:\.hubconv-[a-z]+-\d+)+)(?:-old)?")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    stale = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            continue
        path = os.path.join(parent, name)
        pids = {int(p) for p in _STAGING_PID.findall(match[1])}
        if os.path.isdir(path) and not os.path.islink(path) and not any(_pid_alive(p) for p in pids):
            stale.append(path)
    return sorted(stale)


def remove_stale_staging(output: str) -> list[str]:
    """Remove `stale_staging(output)`; returns what was removed."""
    removed = stale_staging(output)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
