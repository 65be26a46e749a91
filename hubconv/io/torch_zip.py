"""Limits on torch.save zip archives (`.pt` files, DCP `.distcp` tensor records), checked before anything is inflated.

torch.save writes every member stored (uncompressed), but a reader inflates whatever the central
directory declares, so a deflated `data.pkl` of a few KiB can expand to gigabytes (a zip bomb). The
central directory is checked first: member count, and every compressed member's declared size, are
bounded; members are then read through bounded reads only.
"""

from __future__ import annotations

import zipfile

from hubconv.errors import CheckpointError

MAX_COMPRESSED_MEMBER = 64 * 1024  # torch never compresses; anything bigger is refused unread
MAX_RECORD_PICKLE = 64 * 1024  # one DCP tensor record's data.pkl is well under 1 KiB
MAX_RECORD_MEMBERS = 64  # a DCP tensor record holds ~7 members
MAX_FILE_MEMBERS = 1 << 20  # a torch file holds one member per storage, plus ~6

# What zipfile and struct raise on malformed archives; callers turn these into CheckpointErrors.
ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # unsupported compression method
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    KeyError,
    IndexError,
)


def check_members(zf: zipfile.ZipFile, what: str, *, max_members: int) -> list[zipfile.ZipInfo]:
    """The archive's members, after refusing too many members or a compressed member above the bound."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise CheckpointError(f"{what}: zip archive has {len(infos)} members (at most {max_members} expected)")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and max(info.file_size, info.compress_size) > MAX_COMPRESSED_MEMBER:
            raise CheckpointError(
                f"{what}: member {info.filename!r} is compressed and declares {info.file_size} bytes "
                f"(at most {MAX_COMPRESSED_MEMBER} allowed; torch.save never compresses)"
            )
    return infos


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> bytes:
    """`info`'s bytes, refusing a declared or actual size above `limit` without inflating past it."""
    if max(info.file_size, info.compress_size) > limit:
        raise CheckpointError(f"{what}: member {info.filename!r} declares {info.file_size} bytes (at most {limit})")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{what}: member {info.filename!r} is larger than it declares (over {limit} bytes)")
    return data
