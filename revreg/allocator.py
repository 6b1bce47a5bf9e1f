"""Keep freed memory for reuse in processes that stream HTTP bodies.

An HTTP stack hands over every body chunk as a new bytes object (uvloop copies each socket read
into one, httptools each body slice into another; httpcore each 1 MiB read on a download). With
glibc's defaults a freed chunk of that size is either unmapped (above the mmap threshold) or
trimmed off the top of the heap (above the trim threshold), so the next one faults in fresh,
zeroed pages: on a 1 GiB upload that was most of the server's system time
(`python benchmarks/bench_pipeline.py --only allocator`, docs/performance.md). With chunks up to
MMAP_THRESHOLD served from the heap and up to TRIM_THRESHOLD of free heap kept, they reuse the
same pages. What stays mapped does not grow with the size of a body: it is what is in flight
at once (LENT_BLOCKS chunks and the HTTP libraries' buffers) plus at most TRIM_THRESHOLD of
free memory kept per malloc arena (glibc makes an arena per thread that allocates, up to
8 x cores).

glibc only (`mallopt`); anywhere else, or without ctypes, this does nothing. It changes the
whole process's allocator, so only `revreg serve` calls it for its own process; a program that
embeds revreg's server decides for itself.
"""

from __future__ import annotations

import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # above the largest chunk (1 MiB reads, 256 KiB socket reads)
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed body-sized chunks instead of returning them; True if it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (ImportError, OSError, AttributeError):  # a CPython without ctypes, or no such libc call
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either turns off glibc's own adjustment of both, so both are set.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
