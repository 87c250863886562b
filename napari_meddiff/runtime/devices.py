"""Device choice: ``auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import functools

import torch

from napari_meddiff.choices import DEVICES  # noqa: F401  (re-exported)
from napari_meddiff.errors import MeddiffError


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MeddiffError("CUDA was asked for but no CUDA GPU is available (use --device cpu or auto)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise MeddiffError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    """/proc/cpuinfo, read once (asked at every sampling call)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """True when this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bf16 matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_supports_bf16()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors: free CUDA memory, or the kernel's ``MemAvailable`` on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from napari_meddiff.runtime.memory import available_ram_bytes

    return available_ram_bytes()
