"""A read-only, seekable byte window of a file (a tar member, a DCP record), so `zipfile` can read it in place."""

from __future__ import annotations

import io
import os
from typing import Any

from hubconv.io.files import FilePool


class Window(io.RawIOBase):
    """`length` bytes at `offset` of `path`, read through `pool`; seeks never reach outside the window."""

    def __init__(self, pool: FilePool, path: str, offset: int, length: int):
        self.pool, self.path, self.base, self.length, self.pos = pool, path, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        new = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        if new < 0:  # never read in front of the window
            raise OSError(f"negative seek position {new} in a file window")
        self.pos = new
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.pool.fd(self.path), n, self.base + self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)
