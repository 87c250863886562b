"""The training machine: device and threads, precision and memory layout (chosen by timing), and its description."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import time

import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.runtime.devices import cpu_supports_bf16, resolve_device
from napari_meddiff.training.distributed import unwrap


def setup_device(name: str, num_threads: int | None) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return device


def resolve_training_precision(precision: str, device: torch.device) -> str:
    """The arithmetic a training stage runs in. ``auto``: on CUDA bf16 where the GPU has it, else fp16 (with a
    GradScaler, `grad_scaler`); on CPU bf16 autocast where the CPU computes bf16 natively (`cpu_supports_bf16`),
    else fp32. fp16 is refused here on CPU, before any data is loaded.

    Deliberately not inference's rule (`napari_meddiff.runtime.precision.resolve_precision`): that one keeps
    fp32 on CUDA, where sampling the shipped networks is launch-bound and autocast's casts made steps slower,
    whereas a training step is a large batched forward and backward pass, run in half precision on a GPU. On CPU
    both rules agree."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise MeddiffError(f"training precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise MeddiffError("fp16 training is for CUDA; use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# Memory layouts of 3D training: oneDNN's blocked NDHWC kernels (channels_last_3d) are faster for bf16 on
# AMX/AVX-512 BF16 CPUs; their results depend on the thread count, which matters for sampling, not training.
LAYOUTS = ("contiguous", "channels_last_3d")


def to_layout(x, layout: str):
    """A tensor or module in ``layout`` (channels_last_3d applies to 5D tensors only)."""
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=fmt)
    return x.contiguous(memory_format=fmt) if x.ndim == 5 else x.contiguous()


def time_train_step(
    step,
    net: torch.nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    precision: str,
    layout: str,
    repeats: int = 2,
) -> float:
    """Best seconds of ``repeats`` forward+backward passes of ``step(net, x) -> loss`` on a copy of ``net``
    (after a warm-up), on random input of ``shape``; the global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        trial = to_layout(copy.deepcopy(unwrap(net)), layout).train()
        x = to_layout(torch.rand(shape, device=device), layout)
        best = float("inf")
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast(device, precision):
                loss = step(trial, x)
            loss.backward()
            if i:
                best = min(best, time.perf_counter() - t0)
        return best


def resolve_layout(
    layout: str, step, net: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str
) -> tuple[str, dict[str, float]]:
    """The memory layout to train in: ``layout`` itself, or for ``auto`` the faster of the two measured on
    this machine (3D CPU training only; contiguous otherwise). Returns (layout, seconds per layout)."""
    if layout != "auto" and layout not in LAYOUTS:
        raise MeddiffError(f"memory_format must be auto, {' or '.join(LAYOUTS)}, not {layout!r}")
    if layout != "auto":
        return layout, {}
    if device.type != "cpu" or len(shape) != 5:
        return "contiguous", {}
    times = {lay: time_train_step(step, net, shape, device, precision, lay) for lay in LAYOUTS}
    return min(times, key=times.get), times


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 on CUDA; disabled otherwise (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def processor_identity(device: torch.device) -> str:
    """What decides which memory layout is fastest: the CUDA device's name, or the CPU's model name and whether
    it computes bf16 natively (an AVX2-only and an AVX-512 BF16 EPYC share a model name)."""
    from napari_meddiff.runtime.devices import cpu_supports_bf16

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()}, native bf16: {cpu_supports_bf16()}"


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def machine_description(device: torch.device, world: int = 1) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_model_name()} CPU ({os.cpu_count()} cores, shared), {torch.get_num_threads()} torch thread(s)"
    return what + (f" x {world} processes (torchrun)" if world > 1 else "")
