"""Per-rank checkpoints (Megatron `mp_rank_TT[_PPP]` files, NeMo `mp_rank_XX/model_weights.ckpt`) as one Checkpoint.

Convention shared by the Megatron and NeMo readers, for the un-shard step: with one rank, tensors keep
their own names; with several, every tensor, entry and value of rank file `d` is named `d/<name>`
(`d` the rank folder, e.g. `mp_rank_01_002`), and `values["ranks"]` lists them in (pp, tp) order as
`{"prefix": "mp_rank_01_002/", "tp": 1, "pp": 2}`, beside `values["tensor_parallel"]` and
`values["pipeline_parallel"]` (the sizes). Single-rank checkpoints carry the same three values with
prefix "".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Rank:
    """One rank file: its tensor- and pipeline-parallel rank and its folder name (the prefix without '/')."""

    tp: int
    pp: int
    folder: str


def check_complete(ranks: list[Rank], what: str, name: str) -> tuple[int, int]:
    """(TP size, PP size) of `ranks`, after refusing a grid with a missing or duplicated rank.

    `name(tp, pp)` spells a missing rank's folder for the message."""
    if not ranks:
        raise CheckpointError(f"{what}: no rank files found")
    tp_size = max(r.tp for r in ranks) + 1
    pp_size = max(r.pp for r in ranks) + 1
    seen: dict[tuple[int, int], str] = {}
    for r in ranks:
        if (r.tp, r.pp) in seen:
            raise CheckpointError(f"{what}: {seen[(r.tp, r.pp)]} and {r.folder} are the same rank")
        seen[(r.tp, r.pp)] = r.folder
    for pp in range(pp_size):
        for tp in range(tp_size):
            if (tp, pp) not in seen:
                raise CheckpointError(
                    f"{what}: rank {name(tp, pp)} is missing (tensor parallel {tp_size}, pipeline parallel {pp_size})"
                )
    return tp_size, pp_size


def merge(path: str, fmt: str, opened: list[tuple[Rank, Checkpoint]], values: dict[str, Any]) -> Checkpoint:
    """One Checkpoint of the rank checkpoints `opened` (named as the module docstring says), plus `values`."""
    opened = sorted(opened, key=lambda x: (x[0].pp, x[0].tp))
    single = len(opened) == 1
    tensors: dict[str, Any] = {}
    entries: list[str] = []
    merged: dict[str, Any] = {}
    ranks = []
    for rank, ckpt in opened:
        prefix = "" if single else f"{rank.folder}/"
        ranks.append({"prefix": prefix, "tp": rank.tp, "pp": rank.pp})
        tensors.update({prefix + k: v for k, v in ckpt.tensors.items()})
        entries.extend(prefix + e for e in ckpt.entries)
        merged.update({prefix + k: v for k, v in ckpt.values.items()})
    merged.update(values)
    merged["ranks"] = ranks
    merged["tensor_parallel"] = max(r.tp for r, _ in opened) + 1
    merged["pipeline_parallel"] = max(r.pp for r, _ in opened) + 1
    closers = [c for _, ckpt in opened for c in ckpt.closers]
    return Checkpoint(path=path, format=fmt, tensors=tensors, entries=entries, values=merged, closers=closers)
