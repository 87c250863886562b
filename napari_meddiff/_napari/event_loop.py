"""How long napari's event loop was stuck: a QTimer heartbeat (widget tests, benchmarks/bench_widget_vs_cli.py).

A `Heartbeat` ticks every ``interval_ms`` in the GUI thread and notes the wall clock and the GUI thread's own CPU
time at each tick. A gap between two ticks longer than the interval is time the event loop could not run: the
GUI thread was busy (``cpu`` of the gap: work on the event loop, e.g. napari making a layer) or waited (for a
core or the GIL: ``seconds - cpu``, what a task's threads, or other processes, take from the GUI).
`Heartbeat.others_busy` says how many cores other processes kept busy meanwhile: timings from a busy machine
say little about a quiet one.
"""

from __future__ import annotations

import dataclasses
import time

from qtpy.QtCore import QTimer

from napari_meddiff.runtime.threads import cpu_counters, others_busy_between


@dataclasses.dataclass(frozen=True)
class Gap:
    at: float  # perf_counter of the tick before the gap
    seconds: float  # wall time between the two ticks
    cpu: float  # the GUI thread's CPU seconds between them

    def __str__(self) -> str:
        return f"{1000 * self.seconds:.0f} ms ({1000 * self.cpu:.0f} ms of it the GUI thread's CPU)"


class Heartbeat:
    """A QTimer in the GUI thread; `longest` is the longest gap between its ticks in a window of time."""

    def __init__(self, interval_ms: int = 10) -> None:
        self.interval_ms = interval_ms
        self.ticks: list[tuple[float, float]] = []  # (perf_counter, thread_time of the GUI thread)
        self._timer = QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)
        self._counters: list[tuple[int, int, int] | None] = [None, None]  # machine's CPU at start and stop

    def _tick(self) -> None:
        self.ticks.append((time.perf_counter(), time.thread_time()))

    def start(self) -> Heartbeat:
        self._counters[0] = cpu_counters()
        self._tick()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.stop()
        self._tick()
        self._counters[1] = cpu_counters()

    def others_busy(self) -> float | None:
        """Cores other processes kept busy from `start` to `stop` (None where not measurable)."""
        return others_busy_between(*self._counters)

    def gaps(self, start: float | None = None, end: float | None = None) -> list[Gap]:
        """Gaps between consecutive ticks that overlap [start, end] (the one around ``start`` included: a click
        handled between two ticks stalls the loop from the tick before it)."""
        start = -float("inf") if start is None else start
        end = float("inf") if end is None else end
        return [Gap(a, b - a, cb - ca) for (a, ca), (b, cb) in zip(self.ticks, self.ticks[1:]) if b > start and a < end]

    def longest(self, start: float | None = None, end: float | None = None) -> Gap:
        return max(self.gaps(start, end), key=lambda g: g.seconds, default=Gap(start or 0.0, 0.0, 0.0))
