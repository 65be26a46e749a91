"""Megatron-LM legacy checkpoint folders: one torch.save file per tensor- and pipeline-parallel rank.

Layout (Megatron-LM `checkpointing.get_checkpoint_name`): a save folder holds `latest_checkpointed_iteration.txt`
(an iteration number or `release`) and `iter_XXXXXXX/` (or `release/`) folders; each holds `mp_rank_TT/`
(no pipeline parallelism) or `mp_rank_TT_PPP/` folders with `model_optim_rng.pt` (`model_rng.pt` accepted
too). Accepted as `--checkpoint`: the save folder (the tracker file picks the iteration, else its single
iteration folder), or an iteration folder itself. Every rank file is read with the torch-free zip reader
(`args` becomes a plain dict; RNG state's numpy arrays stay opaque), every path through `confined`.

The grid is checked complete before anything is read: a hole, a rank beyond the saved
`args.tensor_model_parallel_size` / `pipeline_model_parallel_size`, a rank missing at the end, an unexpected
folder or mixed naming are one-line errors naming the folder. Expert-parallel suffixes (`mp_rank_TT_PPP_EEE`)
are refused. The result follows `hubconv.io.ranks` (prefix `mp_rank_TT[_PPP]/` per rank when there are
several) and carries rank 0's `args`, `checkpoint_version` and `iteration` unprefixed as well.

Megatron-core `torch_dist` iteration folders (`metadata.json` with `"sharded_backend": "torch_dist"`, `common.pt`,
DCP `.metadata` and `*.distcp`) hold one global checkpoint: its tensors come from the DCP reader, and
`common.pt` (args, checkpoint_version, iteration, ...) is read like a rank file into `values`, beside
`values["dist_metadata"]` (the parsed `metadata.json`). Other sharded backends (zarr) are refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from hubconv.errors import CheckpointError
from hubconv.io import ranks
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.paths import confined
from hubconv.io.torch_file import open_torch_zip

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILES = ("model_optim_rng.pt", "model_rng.pt")
DIST_METADATA = "metadata.json"  # megatron.core.dist_checkpointing.core.CONFIG_FNAME
COMMON = "common.pt"  # megatron.core.dist_checkpointing.serialization.COMMON_STATE_FNAME
MAX_DIST_METADATA = 64 * 1024
_ITER = re.compile(r"iter_(\d{7,})|release")
_RANK = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?")


def _dirs(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))


def is_megatron_folder(path: str, head: bytes = b"") -> bool:
    """A save folder (tracker file or iteration folders) or an iteration folder (`mp_rank_*` folders)."""
    names = _dirs(path)
    if os.path.isfile(os.path.join(path, TRACKER)) or any(_RANK.fullmatch(n) for n in names) or _is_dist(path):
        return True
    return any(_ITER.fullmatch(n) and any(_RANK.fullmatch(m) for m in _dirs(os.path.join(path, n))) for n in names)


def _is_dist(path: str) -> bool:
    """A megatron-core dist checkpoint: its `metadata.json` names a `sharded_backend` (other JSON files are not)."""
    try:
        with open(os.path.join(path, DIST_METADATA), "rb") as f:
            return b'"sharded_backend"' in f.read(4096)
    except OSError:
        return False


def _open_dist(folder: str) -> Checkpoint:
    """A megatron-core `torch_dist` iteration folder: DCP tensors plus `common.pt` and `metadata.json` values."""
    from hubconv.io.dcp import open_dcp

    meta_file = confined(folder, DIST_METADATA, f"{folder}: {DIST_METADATA}")
    with open(meta_file, "rb") as f:
        raw = f.read(MAX_DIST_METADATA + 1)
    where = os.path.join(folder, DIST_METADATA)
    if len(raw) > MAX_DIST_METADATA:
        raise CheckpointError(f"{where}: larger than {MAX_DIST_METADATA} bytes")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{where}: not JSON ({e})") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend != "torch_dist":
        raise CheckpointError(f"{where}: sharded_backend {backend!r} is not supported (only 'torch_dist')")
    common_file = confined(folder, COMMON, f"{folder}: {COMMON}")
    if not os.path.isfile(common_file):
        raise CheckpointError(f"{os.path.join(folder, COMMON)}: missing; a torch_dist checkpoint needs it")
    common = open_torch_zip(common_file)
    try:
        ckpt = open_dcp(folder)
    except BaseException:
        common.close()
        raise
    if common.tensors:
        ckpt.entries.extend(f"{COMMON}:{k}" for k in common.tensors)
    values = common.values
    if list(values) == [""] and isinstance(values[""], dict):  # no tensors at all: the walker keeps the whole dict
        values = values[""]
    ckpt.values.update(values)
    ckpt.values["dist_metadata"] = meta
    ckpt.values["iteration_folder"] = folder
    ckpt.format = "megatron-torch-dist"
    ckpt.closers.extend(common.closers)
    return ckpt


def _iteration_folder(path: str) -> str:
    """The iteration folder `path` names: itself, the tracker's choice, or the single `iter_*`/`release` folder."""
    names = _dirs(path)
    if any(_RANK.fullmatch(n) for n in names) or _is_dist(path):
        return path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(confined(path, TRACKER, f"{tracker}"), "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
        if text == "release":
            sub = "release"
        elif text.isdigit():
            sub = f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:20]!r}")
        folder = confined(path, sub, f"{tracker}: iteration folder {sub!r}")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{tracker}: names iteration {text}, but {os.path.join(path, sub)} is missing")
        return folder
    iters = [n for n in names if _ITER.fullmatch(n)]
    if len(iters) != 1:
        found = ", ".join(iters) or "none"
        raise CheckpointError(f"{path}: no {TRACKER}, and not exactly one iter_*/release folder ({found}); name one")
    return confined(path, iters[0], f"{path}: iteration folder {iters[0]!r}")


def _rank_grid(folder: str) -> list[tuple[ranks.Rank, str]]:
    """Every rank folder's Rank and its rank file (confined), checked as a complete grid."""
    found: list[tuple[ranks.Rank, str]] = []
    styles = set()
    for name in _dirs(folder):
        m = _RANK.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{os.path.join(folder, name)}: unexpected folder in a Megatron iteration folder")
        if m[3]:
            raise CheckpointError(f"{os.path.join(folder, name)}: expert-parallel rank folders are not supported")
        styles.add(m[2] is None)
        sub = confined(folder, name, f"{folder}: rank folder {name!r}")
        files = [f for f in RANK_FILES if os.path.isfile(os.path.join(sub, f))]
        if len(files) != 1:
            want = " or ".join(RANK_FILES) if not files else "only one of " + ", ".join(files)
            raise CheckpointError(f"{sub}: expected {want}")
        rank_file = confined(folder, os.path.join(name, files[0]), f"{folder}: rank file {name}/{files[0]!r}")
        found.append((ranks.Rank(int(m[1]), int(m[2] or 0), name), rank_file))
    if len(styles) > 1:
        raise CheckpointError(f"{folder}: mixes mp_rank_TT and mp_rank_TT_PPP folders")
    pp_style = styles == {False}

    def name(tp: int, pp: int) -> str:
        return f"mp_rank_{tp:02d}_{pp:03d}" if pp_style else f"mp_rank_{tp:02d}"

    ranks.check_complete([r for r, _ in found], folder, name)
    return found


def _check_args(folder: str, values: dict[str, Any], tp_size: int, pp_size: int, rank_file: str) -> None:
    """The saved parallel sizes agree with the folders found (a rank missing at the end of the grid)."""
    args = values.get("args")
    if not isinstance(args, dict):
        return
    for key, found in (("tensor_model_parallel_size", tp_size), ("pipeline_model_parallel_size", pp_size)):
        saved = args.get(key)
        if isinstance(saved, int) and saved != found:
            raise CheckpointError(f"{rank_file}: args.{key} is {saved}, but {folder} holds {found} rank(s) for it")


def open_megatron(path: str) -> Checkpoint:
    """The rank files of a Megatron-LM legacy checkpoint as one Checkpoint (see the module docstring)."""
    folder = _iteration_folder(path)
    if _is_dist(folder):
        return _open_dist(folder)
    grid = _rank_grid(folder)
    tp_size = max(r.tp for r, _ in grid) + 1
    pp_size = max(r.pp for r, _ in grid) + 1
    opened: list[tuple[ranks.Rank, Checkpoint]] = []
    try:
        for rank, rank_file in sorted(grid, key=lambda x: (x[0].pp, x[0].tp)):
            with open(rank_file, "rb") as f:
                if f.read(2) == b"\x80\x02":
                    raise CheckpointError(
                        f"{rank_file}: a legacy (pre-zip) torch pickle; re-save it with torch >= 1.6 to read it safely"
                    )
            ckpt = open_torch_zip(rank_file)
            opened.append((rank, ckpt))
            _check_args(folder, ckpt.values, tp_size, pp_size, rank_file)
            first = opened[0][1].values
            if ckpt.values.get("checkpoint_version") != first.get("checkpoint_version"):
                raise CheckpointError(
                    f"{rank_file}: checkpoint_version {ckpt.values.get('checkpoint_version')!r} differs from "
                    f"rank 0's {first.get('checkpoint_version')!r}"
                )
    except BaseException:
        for _, ckpt in opened:
            ckpt.close()
        raise
    first = opened[0][1].values
    extra = {k: first[k] for k in ("args", "checkpoint_version", "iteration") if k in first}
    extra["iteration_folder"] = folder
    return ranks.merge(folder, "megatron", opened, extra)
