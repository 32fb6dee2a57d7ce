"""What autoconv knows about a device: its identity (the fingerprint results are keyed on) and the
limits every kernel config is checked against before it is compiled."""

from __future__ import annotations

from dataclasses import dataclass

# One table turns the many spellings drivers report into one vendor name.
VENDOR_NAMES = {
    "nvidia": "nvidia",
    "advanced micro devices": "amd",
    "authenticamd": "amd",
    "amd": "amd",
    "intel": "intel",
    "genuineintel": "intel",
    "apple": "apple",
    "arm": "arm",
    "qualcomm": "qualcomm",
    "portable computing language": "pocl",
}


def normalise_vendor(raw: str) -> str:
    lowered = raw.strip().lower()
    for needle, vendor in VENDOR_NAMES.items():
        if needle in lowered:
            return vendor
    return lowered or "unknown"


@dataclass(frozen=True)
class DeviceLimits:
    """What a device allows a kernel; constraints are checked against these before compiling."""

    max_work_group_size: int
    max_work_item_sizes: tuple[int, ...]
    local_mem_bytes: int
    max_vector_width: int = 16  # widest floatN the kernel language offers; CUDA C++ has no float ops on float4


@dataclass(frozen=True)
class DeviceInfo:
    """What identifies a device for caching and tuning, and what limits its kernels."""

    backend: str
    platform: str
    vendor: str
    name: str
    driver: str
    device_type: str  # "cpu", "gpu", "accelerator" or "host"
    compute_units: int
    local_mem_bytes: int
    max_work_group_size: int
    max_work_item_sizes: tuple[int, ...]
    max_alloc_bytes: int = 0  # largest single buffer (0: unknown, not checked)
    global_mem_bytes: int = 0  # memory for all buffers together (0: unknown, not checked)

    def fingerprint(self) -> str:
        """Everything that can change a kernel's speed or correctness: results are keyed on it."""
        return f"{self.backend}|{self.platform}|{self.vendor}|{self.name}|{self.driver}"

    def limits(self) -> DeviceLimits:
        # CUDA C++ has no arithmetic on float4 & co., so the CUDA dialect's accumulators are scalar.
        vector_width = 1 if self.backend == "cuda" else 16
        return DeviceLimits(self.max_work_group_size, self.max_work_item_sizes, self.local_mem_bytes, vector_width)
