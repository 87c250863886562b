"""Thread policy on a shared machine (napari_meddiff/runtime/threads.py): sleep at barriers, use the free cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.runtime import threads

_CHILD = (
    "import os, napari_meddiff; imported = os.environ.get('OMP_WAIT_POLICY'); napari_meddiff.generate; "
    "import torch; from napari_meddiff.runtime.threads import use_free_cores; "
    "print(imported, os.environ.get('OMP_WAIT_POLICY'), use_free_cores(), torch.get_num_threads())"
)


def _child(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", threads.THREADS_ENV)}
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env={**base, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_openmp_sleeps_at_barriers_unless_the_user_chose():
    # importing the package (napari's plugin discovery) changes nothing; the first task loads with OpenMP
    # threads asleep at barriers, set before torch loads libgomp
    assert _child(MEDDIFF_THREADS="1") == ["None", "PASSIVE", "1", "1"]
    imported, policy, chosen, n = _child(MEDDIFF_THREADS="torch")  # PyTorch's own behaviour, as before
    assert imported == policy == "None" and chosen == "None" and int(n) == threads.usable_cores()


def test_a_later_call_after_torch_loads_still_sets_the_threads():
    """The OMP_NUM_THREADS that use_free_cores wrote before torch loaded is not mistaken for the user's."""
    code = (
        "import sys; from napari_meddiff.runtime.threads import use_free_cores; a = use_free_cores(); "
        "assert 'torch' not in sys.modules; import torch; b = use_free_cores(); print(a, b, torch.get_num_threads())"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", threads.THREADS_ENV)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**base, threads.THREADS_ENV: "1"}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"]


def test_thread_count_setting(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a shell's own setting would win (as it should)
    try:
        monkeypatch.setenv(threads.THREADS_ENV, "3")
        assert threads.use_free_cores() == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv(threads.THREADS_ENV, "many")
        with pytest.raises(MeddiffError, match="MEDDIFF_THREADS"):
            threads.use_free_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice is kept
        assert threads.use_free_cores() is None and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


def test_a_busy_process_leaves_fewer_threads():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        threads.configure_waiting()  # the measuring window starts here
        time.sleep(1.0)
        assert threads.others_busy_cores() >= 0.7  # the busy loop, at least (other processes may add)
        assert threads.free_core_threads() <= max(1, threads.usable_cores() - 1)
    finally:
        busy.kill()
        busy.wait()


def test_a_task_thread_yields_to_the_gui_thread_alone():
    """`yield_to_the_gui` lowers the calling thread and the OpenMP threads it starts, not the process's others."""
    import threading

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def task():
        seen["lowered"] = threads.yield_to_the_gui(3)
        torch.set_num_threads(2)
        x = torch.ones(1, 8, 24, 24, 24)
        torch.nn.functional.conv3d(x, torch.ones(8, 8, 3, 3, 3))  # starts this thread's OpenMP team
        seen["own"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["all"] = {int(tid): os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")}

    saved = torch.get_num_threads()
    before = {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")}
    try:
        thread = threading.Thread(target=task)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(saved)
    assert seen["lowered"] and seen["own"] == min(19, main + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    started = {tid: nice for tid, nice in seen["all"].items() if str(tid) not in before}  # the task and its team
    assert started and set(started.values()) == {min(19, main + 3)}, started
    # others keep theirs (threads of earlier tasks in this process may sit lower already)
    assert all(nice == before[str(tid)] for tid, nice in seen["all"].items() if str(tid) in before)


def test_the_load_is_measured_from_the_last_restart():
    threads.configure_waiting()
    time.sleep(0.2)
    threads.restart_measuring()
    assert threads.others_busy_cores() is None  # a new window: too short to say yet
