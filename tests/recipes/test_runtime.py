"""``selfish-rnn``'s process settings: glibc's malloc keeps freed per-step buffers for reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from lightning_selfish_recipes.runtime import HEAP_LIMIT_BYTES

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "gnu_get_libc_version"),
    reason="glibc only",
)


@glibc
def test_large_buffers_come_from_the_heap_after_the_setting() -> None:
    """A 64 MB block: mapped (and unmapped when freed) by default, served from the heap once the setting applies."""
    script = f"""
import ctypes, ctypes.util
from lightning_selfish_recipes.runtime import keep_freed_memory_for_reuse
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
assert size < {HEAP_LIMIT_BYTES}
def mapped():  # glibc marks a chunk it served with mmap by the IS_MMAPPED bit (2) of the size word before it
    a = libc.malloc(size)
    flag = bool(ctypes.c_size_t.from_address(a - ctypes.sizeof(ctypes.c_size_t)).value & 2)
    libc.free(a)
    return flag
before = mapped()
assert keep_freed_memory_for_reuse()
after = mapped()
print(before, after)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    assert (before, after) == ("True", "False")
