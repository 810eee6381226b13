"""Give memory freed on the CPU back to the system: glibc's heap otherwise keeps it.

glibc serves allocations below its mmap threshold from the heap and keeps freed heap memory for
reuse; the threshold also rises (up to 32 MB) each time a larger mmapped block is freed. Building a
model frees a lot (checkpoint buffers, the fp32 weights a quantized layer is made from), and a
quantized base dequantizes one weight after another in every forward and backward pass, so the
resident size of the process can stay well above what its tensors hold (docs/scale.md). On Linux
with glibc :func:`trim` (``malloc_trim(0)``) returns the free heap memory at once; elsewhere (macOS,
musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Return the free heap memory to the system (glibc's ``malloc_trim(0)``); False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
