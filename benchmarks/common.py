"""Shared benchmark helpers: machine description, measured matmul peak, FLOP counting, timing, peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(os.environ.get("MEDDIFF_BENCH_RESULTS") or Path(__file__).parent / "results")  # override: elsewhere


# `python -c CLI_WITH_PEAK PEAK_FILE ARGS`: `meddiff ARGS`, writing its peak RSS (VmHWM, kB) to PEAK_FILE at exit
CLI_WITH_PEAK = (
    "import atexit, sys\n"
    "peak_file = sys.argv.pop(1)\n"
    "def report():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    open(peak_file, 'w').write(line.split()[1])\n"
    "atexit.register(report)\n"
    "sys.argv = ['meddiff'] + sys.argv[1:]\n"
    "from napari_meddiff.cli import main\n"
    "sys.exit(main())\n"
)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from napari_meddiff.runtime.devices import cpu_supports_bf16

    info["cpu_bf16"] = cpu_supports_bf16()
    return info


def others_cpu_use(seconds: float = 2.0) -> float | None:
    """Cores kept busy by other processes while this one sleeps for ``seconds`` (from /proc/stat), or None.

    Unlike the load average, which trails by minutes, this says whether the machine is busy now."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def precisions_for(device: torch.device) -> list[str]:
    """Precisions worth timing on ``device``: bf16 on a CPU only where it is native (emulated bf16 convolutions
    ran some 1000x slower than fp32 on an AVX2-only EPYC), fp16 on CUDA only."""
    from napari_meddiff.runtime.devices import native_bf16

    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return ["fp32"] + (["bf16"] if native_bf16(device) else [])


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048) -> float:
    """Measured matrix-multiply throughput (FLOP/s) for ``dtype``: this machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = timed(lambda: a @ b, repeat=5, warmup=2)
    return 2 * n**3 / seconds


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB): ``VmHWM`` on Linux (``ru_maxrss`` would carry the
    parent's peak into a spawned child, across exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current size (Linux ``clear_refs``); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _die_with_parent() -> None:
    """In a child: be sent SIGTERM when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing),
    so that a killed benchmark does not leave its child computing on the cores the next run measures."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a fresh (spawned) process, which dies with this one; its return value."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, initializer=_die_with_parent) as pool:
        return pool.apply(fn, args)


def pearson(a, b) -> float:
    """Pearson correlation of two sequences (NaN when either is constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
