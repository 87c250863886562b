"""Ending training cleanly: the time/step budget, and Ctrl-C / SIGTERM stopping after the current step."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Budget:
    """Wall-clock budget of a stage, continued across resumes (``spent`` minutes from the checkpoint)."""

    def __init__(self, max_minutes: float | None, spent_minutes: float = 0.0, spent_cpu_minutes: float = 0.0) -> None:
        self.max_minutes = max_minutes
        self.spent0 = float(spent_minutes)
        self.cpu0 = float(spent_cpu_minutes)
        self.t0 = time.time()
        self.c0 = time.process_time()

    @property
    def cpu_minutes(self) -> float:
        """CPU time of this process (all threads) spent in the stage, across resumes."""
        return self.cpu0 + (time.process_time() - self.c0) / 60.0

    @property
    def minutes(self) -> float:
        return self.spent0 + (time.time() - self.t0) / 60.0

    def exhausted(self) -> bool:
        return self.max_minutes is not None and self.minutes >= float(self.max_minutes)


class TrainingStopped(BaseException):
    """Training was asked to stop (Ctrl-C, SIGTERM) and wrote its checkpoint first; ``--resume`` goes on from it.
    A BaseException, as KeyboardInterrupt is: an ``except Exception`` does not swallow the stop."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Ctrl-C / SIGTERM during a training loop (the ``with`` block): the first one asks the loop to stop after
    the current step and checkpoint (a checkpoint every ``checkpoint_minutes`` would otherwise lose up to that
    much) and puts the previous handlers back, so a second one acts as it would have without this. Outside the
    loops (data loading, export) signals act as usual. Installed only from the main thread, and never over a
    signal the process ignores."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None  # kept after the block, for the code after the loop
        self._before: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:  # only sets state: no I/O in a signal handler
        self.signal = signum
        self._restore()

    def _restore(self) -> None:
        for s, before in self._before.items():
            signal.signal(s, before)
        self._before = {}

    def __enter__(self) -> StopRequest:
        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                before = signal.getsignal(s)
                if before is not None and before != signal.SIG_IGN:  # None: a handler set from C, left alone
                    self._before[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


STOP = StopRequest()


def stopped(stage: str, step: int, path: Path, main: bool = True) -> TrainingStopped:
    """The exception that ends a stopped stage; only the main rank (``main``) logs the stop."""
    signum = STOP.signal or signal.SIGTERM  # a rank that got no signal stops with the one that did
    name = signal.Signals(signum).name if STOP.signal else "a stop on another rank"
    if main:
        log.warning("%s: %s stopped at step %d, checkpoint written", name, stage, step)
    return TrainingStopped(
        f"{stage} stopped at step {step} ({name}); checkpoint {path}: the same command with --resume goes on from it",
        signum,
    )
