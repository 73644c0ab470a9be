"""CPU memory tuning: big temporaries without page faults, and overlapping slot moves in one pass.

glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it on free, so each
edit's temporaries (the rotated halves of the suffix keys, attention scores during a
re-encode) fault in every page again, and on a small machine that costs more than the
arithmetic: rotating the suffix of a 2,800-token file spent over half its time in page faults.
Serving large blocks from the heap and not trimming it keeps freed pages mapped for the next
edit. The cost is that the process keeps its peak footprint until a document closes or is
evicted: then release_freed_memory gives the freed pages back.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

import torch

log = logging.getLogger("livekv")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_tuned = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (find_library runs ldconfig: milliseconds, too slow per close)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed large blocks (once per process). Returns whether it
    applied: not on other C libraries, nor with LIVEKV_MALLOC=default."""
    global _tuned
    if _tuned:
        return True
    libc = _libc()
    if libc is None or os.environ.get("LIVEKV_MALLOC") == "default":
        return False
    try:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except AttributeError:  # musl and others have no mallopt
        return False
    _tuned = ok
    log.debug("glibc malloc keeps freed memory: %s", ok)
    return ok


def release_freed_memory() -> bool:
    """Hand freed heap pages back to the kernel (glibc malloc_trim): after a document closes or
    is evicted, when the peak the tuning keeps mapped is no longer what the open files need.
    Returns whether it could (glibc only)."""
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(ctypes.c_size_t(0))
    except AttributeError:  # not glibc
        return False
    return True


def move_slots_(buf: torch.Tensor, src: int, dst: int, n: int) -> None:
    """buf[:, :, dst:dst+n] = buf[:, :, src:src+n] for a contiguous (L, H, C, D) buffer; the
    ranges may overlap. On the CPU each (layer, head) row is one memmove: a single pass, where a
    copy through a temporary reads and writes everything twice and allocates."""
    assert buf.dim() == 4 and 0 <= min(src, dst) and max(src, dst) + n <= buf.shape[2]
    if n <= 0 or src == dst:
        return
    if buf.device.type != "cpu" or not buf.is_contiguous():
        buf[:, :, dst: dst + n] = buf[:, :, src: src + n].clone()  # copy_ refuses partial overlap
        return
    L, H, C, D = buf.shape
    es = buf.element_size()
    row, base = C * D * es, buf.data_ptr()
    a, b, size = src * D * es, dst * D * es, n * D * es
    for r in range(L * H):
        ctypes.memmove(base + r * row + b, base + r * row + a, size)
