"""Give freed memory back to the operating system between calibration units.

Calibration allocates and frees many medium-sized temporaries per unit (activation batches,
observer samples, the MSE search's candidates). glibc's allocator keeps such freed blocks in its
heaps instead of returning them, so the resident set grew by ~90 MB per ViT-Base unit although
no tensor outlived its unit (measured: 8 units, peak RSS 1.27 GB without trimming, 0.55 GB with).
``malloc_trim`` returns the free heap pages; on other C libraries this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache

import torch

__all__ = ["release_memory"]


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_memory() -> None:
    """Collect garbage, return free heap pages to the OS, and empty the CUDA cache when in use."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
