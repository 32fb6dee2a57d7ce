"""Resource checks made before any work: the buffers a plan needs against the device's per-buffer
and total memory, the host arrays against the host's available memory, and kernel int arguments
against int32. A layer that cannot fit fails at once with the size and the limit, never after
minutes of work with a driver traceback or a MemoryError."""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from autoconv.errors import ResourceLimitError

INT32_MAX = 2**31 - 1


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def host_available_bytes() -> int | None:
    """Memory the host can still give this process (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host(what: str, needed_bytes: int) -> None:
    """Raise ResourceLimitError when `needed_bytes` of host memory are not available."""
    available = host_available_bytes()
    if available is not None and needed_bytes > available:
        raise ResourceLimitError(f"{what} needs {format_bytes(needed_bytes)} of host memory; "
                                 f"{format_bytes(available)} is available")


def check_device(device_name: str, max_alloc_bytes: int, global_mem_bytes: int,
                 buffers: Mapping[str, int]) -> None:
    """Every buffer within the device's largest allocation, all together within its memory
    (limits of 0 are unknown and not checked)."""
    if max_alloc_bytes:
        for name, size in buffers.items():
            if size > max_alloc_bytes:
                raise ResourceLimitError(
                    f"the {name} buffer needs {format_bytes(size)}; {device_name} allocates at most "
                    f"{format_bytes(max_alloc_bytes)} per buffer")
    total = sum(buffers.values())
    if global_mem_bytes and total > global_mem_bytes:
        raise ResourceLimitError(f"the buffers need {format_bytes(total)} together; {device_name} has "
                                 f"{format_bytes(global_mem_bytes)} of memory")


def check_int_args(values: Iterable[tuple[str, int]]) -> None:
    """Kernel index arithmetic is 32-bit: every int argument must fit."""
    for name, value in values:
        if not 0 <= value <= INT32_MAX:
            raise ResourceLimitError(f"kernel argument {name}={value} does not fit the kernels' 32-bit indices "
                                     f"(at most {INT32_MAX}); use a smaller batch or layer")
