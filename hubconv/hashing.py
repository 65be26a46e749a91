"""File digests the Hub uses: sha256 (LFS objects) and git blob ids (regular files), read in fixed blocks."""

from __future__ import annotations

import hashlib
import os

BLOCK = 8 * 1024 * 1024


def _update_from_file(h, path: str, block: int) -> str:
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_file(path: str, block: int = BLOCK) -> str:
    """Hex sha256 of a file (the digest the Hub's LFS pointers record)."""
    return _update_from_file(hashlib.sha256(), path, block)


def git_blob_id(path: str, block: int = BLOCK) -> str:
    """Git object id of a file's content (what the Hub reports as a regular file's blob id)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path), usedforsecurity=False)
    return _update_from_file(h, path, block)
