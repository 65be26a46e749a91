"""Positional reads into numpy buffers from a pool of open files."""

from __future__ import annotations

import os
import threading

import numpy as np

from hubconv.errors import CheckpointError


class FilePool:
    """Open-once file descriptors keyed by path, closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:  # writer threads share the pool
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
                    self._fds[path] = fd
        return fd

    def pread_into(self, path: str, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill `out` (contiguous) with bytes at `offset` of `path`; a short read is an error."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = self.fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{path}: file is truncated (wanted {len(view)} bytes at offset {offset}, got {done})"
                )
            done += n
        return out

    def pread(self, path: str, offset: int, nbytes: int) -> bytes:
        data = os.pread(self.fd(path), nbytes, offset)
        if len(data) != nbytes:
            raise CheckpointError(f"{path}: file is truncated (wanted {nbytes} bytes at offset {offset})")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
