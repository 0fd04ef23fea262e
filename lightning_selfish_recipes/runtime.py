"""Process-level settings the ``selfish-rnn`` command applies before training (never imported by the library)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this size come from the heap and stay there once freed: a language model's per-step buffers
#: (logits, their gradients: tens to hundreds of MB) are then reused instead of mapped and unmapped every step.
HEAP_LIMIT_BYTES = 1 << 30


def keep_freed_memory_for_reuse() -> bool:
    """Stop glibc's malloc from returning large per-step CPU buffers to the OS after every step.

    By default glibc serves allocations above a (dynamic) threshold with ``mmap`` and unmaps them when freed, so a
    training step on the CPU page-faults through fresh zeroed pages for every large activation and gradient. In a
    Lightning run the threshold often stays low, and the faults cost up to ~40 % of a small model's step
    (docs/performance.md). Raising the mmap and trim thresholds makes freed buffers reusable, as PyTorch's CUDA
    caching allocator does on a GPU. Returns whether the setting was applied (glibc on Linux only); the peak
    memory of a run does not change, the process just keeps it until exit.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, HEAP_LIMIT_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, HEAP_LIMIT_BYTES) == 1
    log.debug("glibc malloc thresholds raised to %d bytes: %s", HEAP_LIMIT_BYTES, applied)
    return applied
