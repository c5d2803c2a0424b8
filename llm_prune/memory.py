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
import os

# oneDNN, which runs PyTorch's bfloat16 CPU matmuls, keeps every compiled kernel (one per operand
# shape) in a cache of 1,024 by default. Each step of adaptive pruning gives every layer new widths,
# so new shapes, and the resident set grew step after step while the live tensors shrank: on an AMX
# Xeon a 50% adaptive prune of SmolLM2-135M (13 steps) peaked at 1,706 MiB, 1,502 MiB with 256
# entries, in the same time (bench/README.md). Read when oneDNN first compiles, hence at package
# import; a value the user sets wins.
KERNEL_CACHE_ENTRIES = "256"


def bound_kernel_cache() -> None:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def own_mapped_weights(model) -> None:
    """Copy the CPU parameters and buffers that live in a memory-mapped checkpoint into process
    memory, returning each copied range's file pages to the kernel as it goes.

    transformers maps safetensors files; their pages stay resident until every tensor from the file
    is gone, so the weights that pruning replaces would keep counting against memory next to their
    replacements. Copying everything at once would hold two copies; `MADV_DONTNEED` on a clean
    file-backed range only drops it from this process (a later read would fault it back in from
    the file), so the peak stays at one copy plus one tensor.
    """
    import mmap

    import torch

    mappings = _file_mappings()
    madvise = getattr(_libc(), "madvise", None) if hasattr(mmap, "MADV_DONTNEED") else None
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or t.device.type != "cpu" or id(t) in seen:
                    continue
                seen.add(id(t))
                start = t.untyped_storage().data_ptr()
                size = t.untyped_storage().nbytes()
                if not any(lo <= start and start + size <= hi for lo, hi in mappings):
                    continue
                with torch.no_grad():
                    t.data = t.data.clone()
                first, last = -(-start // page) * page, (start + size) // page * page
                if madvise is not None and last > first:  # whole pages inside this tensor only
                    madvise(first, last - first, mmap.MADV_DONTNEED)
