"""Where a widget starts its worker thread.

* `TaskRunner` - runs one task at a time for a widget in a napari ``thread_worker``: drives its
  `ProgressRow`, locks the widget's controls meanwhile, cancels within one step, and turns errors into a
  one-line napari notification.
* `TaskContext` - what the task (a plain function, no Qt inside) gets in the worker thread: progress
  reports, events for the widget, the cancel check.
* `load_model_cached` - `load_model` with a small cache (loads are sha256-checked, so not free).
* `start_loading` / `when_loaded` / `wait_loaded` - torch, MONAI and the tasks imported in a background thread
  (started when the first widget is created), and napari's unit registry built there, so adding a widget or
  making the first layer never freezes napari's event loop; a widget shows "loading…" and stays usable
  meanwhile, and runs what needs torch once they are in.

A task widget (see ``generate.py``)::

    self.progress = ProgressRow()
    self.runner = TaskRunner(self.progress, [settings, button], title="Segment", parent=self)

    def task(ctx: TaskContext):                      # worker thread, no Qt
        model = load_model_cached(ref, device)
        ...core call with on_step=ctx.step_callback(0, steps), should_cancel=ctx.should_cancel...
        ctx.emit(MyEvent(...))                       # -> on_event(event) in the main thread
        return result                                # -> on_result(result)

    self.runner.start(task, on_event=..., on_result=..., on_stop=lambda outcome: ..., text="Loading…")
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import importlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QWidget

from napari_meddiff._napari.widgets.controls import Progress, ProgressRow, format_seconds
from napari_meddiff.errors import Cancelled, MeddiffError
from napari_meddiff.models import DiffusionModel, find_model_dir, load_model
from napari_meddiff.runtime.threads import configure_waiting, restart_measuring, use_free_cores, yield_to_the_gui

logger = logging.getLogger(__name__)
configure_waiting()  # a widget is about to run tasks: OpenMP threads sleep at barriers (before torch loads)


# imported in the background when the first widget is created (each takes seconds; torch alone 1-10 s)
HEAVY_MODULES = (
    "torch",
    "monai",
    "napari_meddiff.runtime.devices",
    "napari_meddiff.tasks.settings",
    "napari_meddiff.tasks.generate",
    "napari_meddiff.tasks.inpaint",
    "napari_meddiff.tasks.segment",
    # first used in a task or when its results become layers, where their import froze the viewer (issue 37):
    "SimpleITK",  # loading its library holds the GIL: 70 ms of the event loop, in a task's first resample
    "pandas",  # a layer's features table: 270 ms at the first Labels layer with class names
    "skimage.color.colorconv",  # napari's Labels layer, at the first one made (skimage.color is a lazy stub)
    "skimage.exposure",
)


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the background import found: the devices torch can use, and the CUDA GPU's name."""

    devices: tuple[str, ...] = ("cpu",)
    cuda_name: str = ""


class _Loader(QObject):
    """Imports `HEAVY_MODULES` in a daemon thread; ``finished`` is delivered in the main thread.

    Then it freezes the objects alive (`gc.freeze`): napari, Qt, torch and MONAI hold half a million, and each
    full garbage collection scanned them all, 0.3 s with the GIL held, in whichever thread it fell (a task's or
    the viewer's): a frozen viewer at unforeseeable moments (issue 37). Later collections scan what came after.
    """

    finished = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()
        self.machine = Machine()
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.preloaded = False  # torch and MONAI were imported before: what is left takes a moment
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self.preloaded = {"torch", "monai"} <= sys.modules.keys()  # before the thread adds them (half-made)
            self._thread = threading.Thread(target=self._run, name="meddiff-imports", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for name in HEAVY_MODULES:
                importlib.import_module(name)
            from napari_meddiff.runtime.devices import available_devices

            devices = tuple(available_devices())
            cuda_name = ""
            if "cuda" in devices:
                import torch

                cuda_name = torch.cuda.get_device_name(0)
            self.machine = Machine(devices, cuda_name)
        except BaseException as exc:  # noqa: BLE001 - shown when a task runs (it imports them again)
            logger.exception("background import failed")
            self.error = exc
        else:
            for warm_up in (build_unit_registry, build_dash_patterns, gc.freeze):
                try:  # each only spares the event loop some work: none may cost the tasks their devices
                    warm_up()
                except Exception:  # noqa: BLE001
                    logger.exception("background warm-up %s failed", warm_up.__name__)
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()
            self.finished.emit()


def build_unit_registry() -> None:
    """Build pint's unit registry here, off the GUI thread: napari builds it at the first layer it makes (any
    layer: its transforms carry units), which took 0.5-3 s of the event loop on the first Generate in an empty
    viewer (issue 37). Handed to pint as its application registry (napari's), unless one is in use already."""
    import pint
    from pint.registry import LazyRegistry

    app = pint.get_application_registry()
    if not isinstance(app.get(), LazyRegistry):
        return  # built (or being built) already: napari made a layer, or another registry was chosen
    registry = pint.UnitRegistry(on_redefinition="raise")  # what pint's lazy default registry builds
    if isinstance(app.get(), LazyRegistry):  # still untouched: no unit of the lazy one is in use anywhere
        pint.set_application_registry(registry)


def build_dash_patterns() -> None:
    """Compute vispy's line dash patterns here, off the GUI thread: napari's first Labels layer (its polygon
    overlay's lines) computed them there, 0.1-0.2 s of the event loop as a segmentation's results appeared (issue
    37). They are cached for the process (``functools.lru_cache``)."""
    from vispy.visuals.line.dash_atlas import DashAtlas

    DashAtlas()


def collect_removed_layers(viewer: Any) -> None:
    """Free a layer removed from ``viewer`` even if it was alive at `gc.freeze` (as a scan the user opened
    before the first widget was): the objects alive then are scanned for garbage again, once, and what survives
    is frozen again. Called by each widget for its viewer; connected once."""
    removed = viewer.layers.events.removed
    if _collect_after_removal not in removed.callbacks:
        removed.connect(_collect_after_removal)


_COLLECTING = [False]


def _collect_after_removal(event: Any = None) -> None:
    if gc.get_freeze_count() and not _COLLECTING[0]:
        _COLLECTING[0] = True  # once for a whole clear(): after napari has let go of the layers
        QTimer.singleShot(0, _collect_and_freeze)


def _collect_and_freeze() -> None:
    _COLLECTING[0] = False
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_LOADER: _Loader | None = None


def _loader() -> _Loader:
    global _LOADER
    if _LOADER is None:  # created in the main thread (by the first widget), so ``finished`` is queued to it
        _LOADER = _Loader()
    return _LOADER


def start_loading() -> None:
    """Start importing torch, MONAI and the tasks in the background (once per process)."""
    _loader().start()


def is_loaded() -> bool:
    return _loader().done.is_set()


def wait_loaded(timeout: float | None = None) -> Machine:
    """Block until the background import is done (a task about to run needs it anyway)."""
    loader = _loader()
    loader.start()
    loader.done.wait(timeout)
    return loader.machine


def when_loaded(receiver: QObject, callback: Callable[[Machine], None]) -> None:
    """``callback(machine)`` in the main thread once the background import is done (now, if it is);
    not at all if ``receiver`` (the widget asking) is deleted first."""
    loader = _loader()
    if {"torch", "monai"} <= sys.modules.keys():
        loader.start()
    else:  # once the widget is docked: the import thread would compete with napari laying it out
        QTimer.singleShot(200, loader.start)
    if loader.preloaded:
        loader.done.wait()  # the slow part was done before (a test session, the napari console): no freeze
    if loader.done.is_set():
        callback(loader.machine)
        return
    holder: dict[str, Any] = {}

    def fire() -> None:
        loader.finished.disconnect(holder["slot"])
        try:
            receiver.objectName()  # RuntimeError once Qt deleted the widget
        except RuntimeError:
            return
        callback(loader.machine)

    holder["slot"] = fire
    loader.finished.connect(fire)


_SELECTING = [0]


@contextlib.contextmanager
def selecting_for_the_user() -> Iterator[None]:
    """Around a widget's own change of the active layer (e.g. selecting a result), so other widgets know
    the user did not choose it (the Segment widget's image follows only the user's choice)."""
    _SELECTING[0] += 1
    try:
        yield
    finally:
        _SELECTING[0] -= 1


def is_selecting_for_the_user() -> bool:
    return _SELECTING[0] > 0


_CACHE_LOCK = threading.Lock()


_MODEL_CACHE: collections.OrderedDict[tuple, DiffusionModel] = collections.OrderedDict()


MODEL_CACHE_SIZE = 2


def load_model_cached(name_or_path: str | Path, device: str = "auto") -> DiffusionModel:
    """`load_model` on the resolved device, reusing the last few loads while the folder is unchanged."""
    from napari_meddiff.runtime.devices import resolve_device  # torch: not at the widget's import

    folder = find_model_dir(name_or_path).resolve()
    dev = resolve_device(device)
    # a bundle keeps its configs in configs/ and its weights in models/
    files = [*sorted(folder.iterdir()), *sorted((folder / "configs").glob("*")), *sorted((folder / "models").glob("*"))]
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    key = (str(folder), str(dev), stamp)
    with _CACHE_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
        model = load_model(folder, device=dev)
        _MODEL_CACHE[key] = model
        while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
        return model


class TaskFailed(Exception):
    """An unexpected error inside a task (wrapped: superqt swallows a bare RuntimeError from a worker)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


class TaskContext:
    """Handed to a task in the worker thread: report progress, send events, check for cancellation."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancel = threading.Event()

    def emit(self, event: Any) -> None:
        """Send ``event`` to the runner's ``on_event`` (called in the main thread, in order)."""
        self.events.put(event)

    def progress(self, done: int, total: int, eta_seconds: float | None = None, text: str = "") -> None:
        self.emit(Progress(int(done), int(total), eta_seconds, text))

    def step_callback(self, offset: int, total: int, text: str = "") -> Callable[[Any], None]:
        """An ``on_step`` for one denoising chain whose steps are ``offset + 1 ...`` of ``total``."""

        def on_step(info: Any) -> None:
            done = offset + info.index
            self.progress(done, total, info.elapsed / info.index * (total - done), text)

        return on_step

    def should_cancel(self) -> bool:
        """Pass as ``should_cancel`` to the core (checked before every network evaluation)."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()


_DONE = object()


def share_the_machine_with_the_gui() -> None:
    """In a task's thread: torch's threads for the cores other processes leave free, as the CLI takes them
    (`use_free_cores`, measured since the last task), and this thread (and the OpenMP threads it starts) a few
    nice levels below napari's event loop (`yield_to_the_gui`), so the GUI runs first when it has work and the
    task has the cores when it has none. Results do not depend on the thread count."""
    use_free_cores()
    restart_measuring()  # the next task measures the load from here
    yield_to_the_gui()


def _drive(task: Callable[[TaskContext], Any], ctx: TaskContext) -> Iterator[Any]:
    """The worker's generator: run ``task`` in a helper thread and yield what it reports, then its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            share_the_machine_with_the_gui()
            box["result"] = task(ctx)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker below
            box["error"] = exc
        finally:
            ctx.events.put(_DONE)

    thread = threading.Thread(target=target, name="meddiff-task", daemon=True)
    thread.start()
    while (event := ctx.events.get()) is not _DONE:
        yield event
    thread.join()
    error = box.get("error")
    if error is None:
        return box.get("result")
    if isinstance(error, (MeddiffError, Cancelled)):
        raise error
    raise TaskFailed(error) from error


class _TaskWorker(GeneratorWorker):
    """napari's generator worker whose ``quit()`` cancels the task (so it ends cleanly within one step)."""

    context: TaskContext | None = None

    def quit(self) -> None:
        if self.context is not None:
            self.context.cancel()
        else:  # pragma: no cover
            super().quit()

    def _relay_error(self, exc: Exception) -> None:  # TaskRunner shows a clear message instead
        pass


@dataclasses.dataclass
class _Run:
    context: TaskContext
    worker: _TaskWorker
    on_result: Callable[[Any], None] | None
    on_event: Callable[[Any], None] | None
    on_stop: Callable[[str], None] | None
    started: float
    cancel_requested: bool = False
    outcome: str = "done"
    message: str = ""
    showing: Iterator[Any] | None = None  # an ``on_result`` that shows its result in turns (see TaskRunner)


def _abandon(run: _Run | None) -> None:
    """The widget is gone: its task stops at its next check, and a result being shown is let go."""
    if run is not None:
        run.context.cancel()
        if run.showing is not None:
            run.showing.close()
            run.showing = None


class TaskRunner(QObject):
    """Runs one task at a time for a widget, with its `ProgressRow` and the controls to lock meanwhile.

    ``start(task, on_result=, on_event=, on_stop=)``: ``task(ctx)`` runs in a worker thread; its
    `Progress` reports drive the progress row, other ``ctx.emit`` events go to ``on_event``, its return
    value to ``on_result``, and ``on_stop(outcome)`` ("done", "cancelled" or "error") always runs last,
    after the controls are enabled again. Errors become a napari error notification.

    An ``on_result`` that is a generator function shows its result in turns: the runner resumes it once per
    event-loop turn (``yield`` after each new layer: each costs napari 0.1-0.3 s of the GUI thread, issue 37),
    and the run ends when it returns.
    """

    running_changed = Signal(bool)

    def __init__(self, progress: ProgressRow, controls: Sequence[QWidget], *, title: str, parent: QWidget) -> None:
        super().__init__(parent)
        self.progress, self.controls, self.title = progress, list(controls), title
        self.run: _Run | None = None
        progress.cancel_button.clicked.connect(self.cancel)
        holder = self._holder = {"run": None}  # plain object: still valid while Qt destroys the widget
        parent.destroyed.connect(lambda *_: _abandon(holder["run"]))

    @property
    def running(self) -> bool:
        return self.run is not None

    def start(
        self,
        task: Callable[[TaskContext], Any],
        *,
        on_result: Callable[[Any], None] | None = None,
        on_event: Callable[[Any], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
        text: str = "Starting…",
    ) -> GeneratorWorker:
        if self.run is not None:
            raise MeddiffError(f"{self.title} is already running")
        ctx = TaskContext()
        worker = create_worker(_drive, task, ctx, _worker_class=_TaskWorker, _ignore_errors=True, _start_thread=False)
        worker.context = ctx
        self.run = self._holder["run"] = _Run(ctx, worker, on_result, on_event, on_stop, time.perf_counter())
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        for widget in self.controls:
            widget.setEnabled(False)
        self.progress.begin(text)
        self.running_changed.emit(True)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running task to stop at its next check (within one denoising step)."""
        if self.run is not None and not self.run.cancel_requested:
            self.run.cancel_requested = True
            self.run.context.cancel()
            self.progress.cancel_button.setEnabled(False)
            self.progress.label.setText("Cancelling after this step…")

    def _call(self, what: str, fn: Callable[..., Any] | None, *args: Any) -> Any:
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a widget bug must not leave the widget locked
            logger.exception("%s: error in %s", self.title, what)
            show_error(f"{self.title}: {type(exc).__name__}: {exc}")
            if self.run is not None and what == "on_event":
                self.cancel()
            return None

    def _on_yielded(self, event: Any) -> None:
        if self.run is None:
            return
        if isinstance(event, Progress):
            if not self.run.cancel_requested:
                self.progress.report(event)
        else:
            self._call("on_event", self.run.on_event, event)

    def _on_returned(self, result: Any) -> None:
        if self.run is not None:
            shown = self._call("on_result", self.run.on_result, result)
            if isinstance(shown, Iterator):
                self.run.showing = shown
                self.progress.cancel_button.setEnabled(False)  # the result is made: it is being shown

    def _on_errored(self, exc: Exception) -> None:
        if self.run is None:
            return
        if isinstance(exc, Cancelled):
            self.run.outcome = "cancelled"
            return
        self.run.outcome = "error"
        original = exc.original if isinstance(exc, TaskFailed) else exc
        if not isinstance(exc, MeddiffError):
            logger.error("%s failed", self.title, exc_info=(type(original), original, original.__traceback__))
        self.run.message = str(exc)
        show_error(f"{self.title} failed: {exc}")

    def _show_next(self, run: _Run) -> None:
        """One turn of a result shown in turns; the next in the next event-loop turn, or the end of the run."""
        assert run.showing is not None
        try:
            next(run.showing)
        except StopIteration:
            run.showing = None
        except Exception as exc:  # noqa: BLE001 - as in `_call`: the widget must not stay locked
            run.showing = None
            run.outcome, run.message = "error", f"{type(exc).__name__}: {exc}"
            logger.exception("%s: error in on_result", self.title)
            show_error(f"{self.title}: {type(exc).__name__}: {exc}")
        QTimer.singleShot(0, self._on_finished)

    def _on_finished(self) -> None:
        if self.run is not None and self.run.showing is not None:
            self._show_next(self.run)
            return
        run, self.run = self.run, None
        self._holder["run"] = None
        if run is None:
            return
        for widget in self.controls:
            widget.setEnabled(True)
        seconds = format_seconds(time.perf_counter() - run.started)
        self.progress.end(
            {"done": f"Done in {seconds}.", "cancelled": "Cancelled.", "error": f"Failed: {run.message}"}[run.outcome]
        )
        self.running_changed.emit(False)
        self._call("on_stop", run.on_stop, run.outcome)
