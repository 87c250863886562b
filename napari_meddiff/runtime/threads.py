"""CPU threads on a shared machine: sleep instead of spinning, and take only the cores that are free.

PyTorch's OpenMP (GNU libgomp) threads spin at every barrier by default. Beside another busy process, a thread
that waits for a partner the kernel has descheduled spins through its own time slice too, so sharing the cores
cost 5x (issue 15). `configure_waiting` asks OpenMP to sleep at barriers (``OMP_WAIT_POLICY=PASSIVE``; it must
be set before torch is imported: the CLI, the package's lazy task import and the widgets call it first,
not the package's import, so napari's plugin discovery leaves its process alone), and `use_free_cores` sets
torch's thread count to the cores that other processes left idle since this process started (or since
`restart_measuring`: napari, open for hours, asks again before each task).

A napari widget's task runs as the CLI does (sleeping at barriers, threads for the free cores) in a thread that
`yield_to_the_gui` placed a few nice levels below napari's: when the event loop has work the kernel runs it
first, and when it has none the task has every free core (capping the task at cores - 1 instead made a
segmentation 3.5x slower than the CLI's on 2 cores, issue 37).

``MEDDIFF_THREADS``: ``auto`` (default), a number of threads, or ``torch`` (PyTorch's own choice and waiting,
as before). A user's ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` always win. Results do not depend on the thread
count (the default NCDHW layout; tests/runtime/test_cpu_kernels.py), so choosing it by load keeps every seed's volume.
"""

from __future__ import annotations

import os
import sys
import threading

THREADS_ENV = "MEDDIFF_THREADS"
TASK_NICE = 5  # nice levels a GUI's task thread sits below the GUI thread (weight 335 against 1024)
_omp_threads_set: str | None = None  # the OMP_NUM_THREADS value use_free_cores set itself (not the user's)
_start: tuple[int, int, int] | None = None  # (/proc/stat busy, /proc/stat total, this process's CPU) ticks


def _setting() -> str:
    return os.environ.get(THREADS_ENV, "auto").strip().lower() or "auto"


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def _own_ticks() -> int:
    """CPU clock ticks used by this process (all its threads) so far."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def configure_waiting() -> None:
    """Before torch loads: OpenMP threads sleep at barriers (unless the user chose), and note the CPU counters."""
    if _setting() == "torch":
        return
    if "torch" not in sys.modules:  # libgomp reads its environment once, when torch loads it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    restart_measuring()


def cpu_counters() -> tuple[int, int, int] | None:
    """(/proc/stat busy, /proc/stat total, this process's CPU) clock ticks now; None where not readable."""
    try:
        return (*_machine_ticks(), _own_ticks())
    except (OSError, ValueError, IndexError):
        return None


def restart_measuring() -> None:
    """Note the CPU counters now: `others_busy_cores` measures from here."""
    global _start
    _start = cpu_counters()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def others_busy_between(start: tuple[int, int, int] | None, end: tuple[int, int, int] | None) -> float | None:
    """Cores that other processes kept busy between two `cpu_counters` (None when not measurable)."""
    if start is None or end is None:
        return None
    elapsed = end[1] - start[1]
    if elapsed < 10:  # under ~0.1 s of all-CPU time: too short a window to say
        return None
    others = (end[0] - start[0]) - (end[2] - start[2])
    return max(0.0, (os.cpu_count() or 1) * others / elapsed)


def others_busy_cores() -> float | None:
    """Cores that other processes kept busy since `configure_waiting` / `restart_measuring` (None when not
    measurable)."""
    return others_busy_between(_start, cpu_counters())


def free_core_threads() -> int:
    """Threads for torch: usable cores minus those other processes keep busy (at least 1)."""
    cores = usable_cores()
    busy = others_busy_cores()
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.5)))


def use_free_cores() -> int | None:
    """Set torch's intra-op threads by `MEDDIFF_THREADS` (see the module docstring); returns the count set."""
    global _omp_threads_set
    setting = _setting()
    omp = os.environ.get("OMP_NUM_THREADS")
    if setting == "torch" or (omp and omp != _omp_threads_set):  # the user's OMP_NUM_THREADS wins
        return None
    if setting == "auto":
        n = free_core_threads()
    else:
        try:
            n = int(setting)
        except ValueError:
            from napari_meddiff.errors import MeddiffError

            raise MeddiffError(f"{THREADS_ENV} must be auto, torch or a number of threads, not {setting!r}") from None
        n = max(1, n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:  # not loaded yet (and not loaded here, for commands that never need it): OpenMP reads this on load
        os.environ["OMP_NUM_THREADS"] = _omp_threads_set = str(n)
    return n


def yield_to_the_gui(levels: int = TASK_NICE) -> bool:
    """Lower the calling thread's priority by ``levels`` nice levels (Linux schedules threads, and the OpenMP
    threads torch starts from this thread inherit it), so the GUI thread of this process runs first whenever it
    has work. For a task thread that ends with its task: a thread cannot raise its priority back. Returns
    whether it could (not on other systems, nor in ``MEDDIFF_THREADS=torch`` mode)."""
    if _setting() == "torch" or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + levels))
    except OSError:
        return False
    return True
