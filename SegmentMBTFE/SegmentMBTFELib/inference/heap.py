"""glibc's malloc, asked to keep freed memory for reuse while the sliding window or a fine-tune's training runs.

Why: the sliding window frees and allocates the same activations and logits again for every pair of tiles,
hundreds or thousands of times, and a fine-tune the same activations and gradients for every step. By default
glibc returns blocks above its mmap threshold (128 KiB at first, 32 MiB at most when it adapts) to the system
when they are freed and trims the top of its heap, so each tile pays page faults to get the same memory back:
on bench_big_ct's CT the kernel's share was 40 of 190 CPU seconds, and a tile of its network took 0.065 s
instead of 0.044 s with the memory kept. Within `reusing_memory()`, blocks up to 1 GiB come from the heap and
freed ones stay there for the next tile; at the end the free memory goes back to the system (malloc_trim) and
the thresholds are set where glibc's own adaptation settles in a process that has freed big blocks (32 MiB and
64 MiB; its adaptation does not resume once they are set, and its initial 128 KiB, fixed, made a fine-tune's
training steps after a prediction 1.37x slower). The tiles' blocks are all alike, so they are reused and peak
memory does not grow. The export's are not: kept in the heap, its arrays of different sizes fragmented it and
the CT's peak grew by 0.8 GB, so it runs outside. Other C libraries (macOS, Windows, musl): nothing changes.
"""
import ctypes
import ctypes.util
import logging
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEPT = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 1 << 30}
# after the block: where glibc's own adaptation settles once big blocks have been freed (its mmap threshold
# rises to the freed block's size up to 32 MiB, the trim threshold to twice that)
AFTER = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        glibc = all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version"))
        return libc if glibc else None
    except OSError:
        return None


_LIBC = _glibc()


@contextmanager
def reusing_memory():
    """Within the block, freed blocks up to 1 GiB stay in the process for reuse (glibc only)."""
    if _LIBC is None:
        yield
        return
    _set(KEPT)
    try:
        yield
    finally:
        _set(AFTER)
        _LIBC.malloc_trim(0)


def _set(values: dict) -> None:
    for option, value in values.items():
        if not _LIBC.mallopt(option, value):
            log.debug("mallopt(%d, %d) was refused", option, value)
