"""The member index of an uncompressed tar archive, read in place (no extraction), every member checked.

An uncompressed tar stores each regular member's bytes contiguously after its header, so a member is
a (offset, size) window of the archive: `tarfile` reads the headers only (it seeks over the data) and
`TarInfo.offset_data` gives the window. Refused, with a one-line error naming the member: compressed
archives (a gzip `.nemo` from old NeMo releases must be decompressed first: `zcat old.nemo > new.nemo`),
names that are absolute or contain `..`, links, devices and sparse members, duplicate names, and data
running past the end of the file.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from hubconv.errors import CheckpointError

MAX_MEMBERS = 100_000
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz", b"\x28\xb5": "zstd"}


@dataclass(frozen=True)
class Member:
    """A regular member's data window: `size` bytes at absolute `offset` of the archive."""

    name: str
    offset: int
    size: int


def _clean(name: str, path: str) -> str:
    """`name` without leading `./`; absolute names and `..` components are refused."""
    while name.startswith("./"):
        name = name[2:]
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts or "\x00" in name or (parts and ":" in parts[0]):
        raise CheckpointError(f"{path}: tar member {name!r} leaves the archive (absolute or '..' name)")
    return name.rstrip("/")


def tar_index(path: str) -> dict[str, Member]:
    """Every regular member of the uncompressed tar at `path`, by name (leading `./` removed); directories skipped."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    kind = _COMPRESSED.get(magic)
    if kind:
        raise CheckpointError(
            f"{path}: {kind}-compressed tar; decompress it first (members are read in place), e.g. "
            f"`{'zcat' if kind == 'gzip' else kind + ' -dc'} {os.path.basename(path)} > uncompressed.nemo`"
        )
    members: dict[str, Member] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if len(members) >= MAX_MEMBERS:
                    raise CheckpointError(f"{path}: tar archive has more than {MAX_MEMBERS} members")
                name = _clean(info.name, path)
                if info.isdir() or not name:
                    continue
                if not info.isreg() or info.issparse():
                    kind = "link" if (info.issym() or info.islnk()) else "special or sparse file"
                    raise CheckpointError(f"{path}: tar member {name!r} is a {kind}; only regular files are read")
                if info.offset_data + info.size > size:
                    raise CheckpointError(
                        f"{path}: tar member {name!r} runs past the end of the file "
                        f"({info.size} bytes at offset {info.offset_data}, file has {size}); truncated?"
                    )
                if name in members:
                    raise CheckpointError(f"{path}: tar member {name!r} appears twice")
                members[name] = Member(name, info.offset_data, info.size)
    except tarfile.TarError as e:
        raise CheckpointError(f"{path}: not a readable uncompressed tar ({type(e).__name__}: {e})") from None
    return members


def read_member(path: str, member: Member, limit: int) -> bytes:
    """A small member's bytes (at most `limit`; bigger is an error naming it)."""
    if member.size > limit:
        raise CheckpointError(f"{path}: tar member {member.name!r} is {member.size} bytes (at most {limit} read)")
    with open(path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise CheckpointError(f"{path}: tar member {member.name!r} is truncated")
    return data
