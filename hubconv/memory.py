"""Keep the streaming converter's memory flat: large block buffers go straight back to the OS.

glibc serves allocations above `M_MMAP_THRESHOLD` with their own mappings, released on free, but it
raises that threshold dynamically after the first large frees; from then on the ~1 MiB blocks that
readers, views and the writer's two threads allocate come from the heap, which fragments and grows
with the number of tensors (measured on a 2 GB nanoGPT conversion: peak RSS 175-194 MiB with the
dynamic threshold, 134 MiB with a fixed one, and no slower). Setting the threshold explicitly turns
the dynamic adjustment off. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (True when set)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
