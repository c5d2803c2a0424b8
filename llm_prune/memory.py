"""Hand freed heap memory back to the operating system between micro-batches.

glibc serves the many 1-30 MB tensors of a forward/backward pass from its heap once their size
has crossed its adaptive mmap threshold, and keeps what they free: without a trim the resident set
of importance scoring grows by about 0.3 GB over a few micro-batches although nothing is alive.
`malloc_trim` returns those free pages (a few milliseconds); elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _trim()
    if trim is not None:
        trim(0)
