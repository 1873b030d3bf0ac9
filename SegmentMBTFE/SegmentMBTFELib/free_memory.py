"""The memory this process can still get, and refusing a job with that figure before allocating, not after.

A model folder or an image header can ask for absurd sizes (an image of 100,000 slices; the estimates of
inference/memory.py for a prediction): allocating first would end in the operating system killing the process
(no message at all) or in a machine that swaps for an hour, so a job that cannot fit is refused first, with what
it would need and what there is. Shared by every layer that allocates (io, inference, batch).
"""
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import OutOfMemory


def available_bytes() -> Optional[int]:
    """Memory this process can still get (free RAM + free swap, within a container's limit); None when
    the system does not say."""
    if sys.platform.startswith("linux"):
        return _linux_available()
    if sys.platform == "win32":
        return _windows_available()
    try:  # macOS and other POSIX systems: physical memory, as the best figure they give
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _linux_available() -> Optional[int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None
    limit = _cgroup_room()
    return min(free, limit) if limit is not None else free


def _cgroup_room() -> Optional[int]:
    """What a container's memory limit still allows (cgroup v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def _windows_available() -> Optional[int]:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), ("total_page", ctypes.c_ulonglong),
                    ("available_page", ctypes.c_ulonglong), ("total_virtual", ctypes.c_ulonglong),
                    ("available_virtual", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.available_page)


def size_text(count: float) -> str:
    """Bytes in words, in the decimal units disks and file managers use: '512 MB', '3.2 GB', '4.1 TB'. The one
    way the product writes a size (memory, disk space, zips, models)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{max(int(count), 0)} bytes"


def refuse_unless_it_fits(needed: float, what: str, advice: str):
    """OutOfMemory('<what> would need about X, but only Y of memory is available; <advice>.') when it cannot fit."""
    available = available_bytes()
    if available is not None and needed > available:
        raise OutOfMemory(f"{what} would need about {size_text(needed)}, but only {size_text(available)} of "
                          f"memory is available; {advice}.")
