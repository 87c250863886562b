"""Which arithmetic a task runs in: ``auto`` resolved per device, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch

from napari_meddiff.choices import AUTOENCODER_PASS_ENV, AUTOENCODER_PASSES, PRECISION_CHOICES, PRECISIONS  # noqa: F401
from napari_meddiff.errors import MeddiffError
from napari_meddiff.runtime.devices import native_bf16

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CPUs that compute bf16 natively (AVX-512 BF16 or AMX), else fp32.

    Chosen by measurement (benchmarks/bench_speed.py, bench_quality.py): on such a CPU bf16 sampling was
    1.8-3x faster and not measurably worse; on CPUs without it bf16 is emulated (some 1000x slower); on an
    H200 the shipped networks are launch-bound, and autocast's casts made bf16/fp16 steps 20-25 % slower."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise MeddiffError(f"precision must be one of {PRECISION_CHOICES}, not {precision!r}")
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise MeddiffError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == "fp16":
        raise MeddiffError("fp16 is for CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])
