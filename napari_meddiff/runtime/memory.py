"""Memory estimates: refuse, up front and with the figures, a request that would exhaust the machine."""

from __future__ import annotations

import functools
import os

from napari_meddiff.errors import MeddiffError

GIB = 2**30


def available_ram_bytes() -> int:
    """The kernel's ``MemAvailable`` (what new allocations can get without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError):
        return 1 << 62  # unknown platform: do not refuse


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op, False).

    glibc keeps much of what a big network's denoising freed mapped to the process, and the decoding that
    follows would add its own peak on top of it."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


MADV_DONTNEED = 4  # Linux: the pages of a private anonymous mapping are dropped (zero if touched again)


def release_pages(address: int, length: int) -> int:
    """Give the whole pages inside ``[address, address + length)`` of private anonymous memory back to the
    system at once (``madvise(MADV_DONTNEED)``; Linux only); their contents are lost. Returns the bytes
    released (0 where it cannot: other systems, or no whole page inside)."""
    import mmap
    import sys

    libc = _glibc()
    if libc is None or not sys.platform.startswith("linux"):
        return 0
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop <= start:
        return 0
    return stop - start if libc.madvise(start, stop - start, MADV_DONTNEED) == 0 else 0


@functools.cache
def _glibc():
    """glibc with ``malloc_trim``, or None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def check_fits(
    need_bytes: float, what: str, *, available: int | None = None, fraction: float = 0.9, advice: str = "ask for less"
) -> None:
    """Raise a `MeddiffError` naming ``what`` when ``need_bytes`` exceeds ``fraction`` of free memory."""
    free = available_ram_bytes() if available is None else int(available)
    if need_bytes > fraction * free:
        raise MeddiffError(
            f"{what} would need about {need_bytes / GIB:.1f} GiB of memory, more than the {free / GIB:.1f} GiB "
            f"free; {advice}"
        )
