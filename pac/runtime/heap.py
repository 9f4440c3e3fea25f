"""Keeping a one-off step after training from raising the process's peak memory (glibc; a no-op elsewhere).

By the end of phase 2, glibc's heap holds the freed pages of every step's temporaries, and its dynamic mmap
threshold has risen to the size of the large blocks training freed, so later blocks of up to that size are
carved from the heap too. The memory's fit after training (pac.models.retrieval) allocates blocks of other
sizes (25 MB logit chunks, distance blocks), which then grew the heap by 0-320 MB past training's peak,
depending on the seed: on the LM default's seed 0, 1209 MB up to the end of training and 1390 MB for the
process. Handing the freed pages back (malloc_trim) and mapping large blocks straight from the kernel for the
step (unmapped as soon as they are freed) kept the process at training's peak, with the same result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
ONE_OFF_THRESHOLD = 1 << 20  # blocks from 1 MiB up bypass the heap during the step
# glibc's ceiling for its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): setting the threshold
# switches the dynamic adjustment off, so after the step it is put at that ceiling, which lets blocks under
# 32 MiB come from the heap again, as the adjustment lets them at most.
RESTORED_THRESHOLD = 32 << 20


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # musl, macOS: neither


@contextmanager
def one_off_step() -> Iterator[None]:
    """Run a step after training without growing the heap past training's peak."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, ONE_OFF_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, RESTORED_THRESHOLD)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB: Linux's high-water mark of its own memory (VmHWM).
    Not getrusage's ru_maxrss, which Linux carries over an exec from the process that forked it: a peer or a
    profiling process started by a larger parent would report the parent's size as its own peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
