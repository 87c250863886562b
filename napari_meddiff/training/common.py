"""Shared training machinery: devices/precision, torchrun data parallel, EMA, checkpoints, learning-rate
warm-up, progress, PNG previews and loss curves."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..devices import cpu_supports_bf16, resolve_device
from ..errors import MeddiffError

log = logging.getLogger(__name__)


# --- distributed -------------------------------------------------------------------------------------


class Dist:
    """torch.distributed when launched under torchrun (gloo on CPU, nccl on CUDA); a no-op otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        self.device = device  # NCCL reduces CUDA tensors only
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return net
        return torch.nn.parallel.DistributedDataParallel(net)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (keeps the ranks in step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


# --- device and precision ----------------------------------------------------------------------------


def setup_device(name: str, num_threads: int | None) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
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


def time_train_step(step, net: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str,
                    layout: str, repeats: int = 2) -> float:
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


def resolve_layout(layout: str, step, net: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                   precision: str) -> tuple[str, dict[str, float]]:
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
    from ..devices import cpu_supports_bf16

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


# --- EMA ---------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a network's parameters (buffers copied)."""

    def __init__(self, net: torch.nn.Module, decay: float, start: int = 0) -> None:
        self.decay = float(decay)
        self.start = int(start)
        self.module = copy.deepcopy(unwrap(net)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        src = unwrap(net)
        d = 0.0 if step < self.start else min(self.decay, (1 + step - self.start) / (10 + step - self.start))
        for e, p in zip(self.module.parameters(), src.parameters()):
            if p.requires_grad:  # a frozen part keeps its average as it is (the lerp would drift it)
                e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), src.buffers()):
            e.copy_(b)


# --- schedule / optimisation ---------------------------------------------------------------------------


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


class TrainingDiverged(MeddiffError):
    """A loss or the data a stage trains on became non-finite (NaN or infinite)."""


def check_finite(value: torch.Tensor, what: str, step: int, precision: str) -> None:
    """Raise `TrainingDiverged` unless every element of ``value`` is finite."""
    if not bool(torch.isfinite(value).all()):
        hint = "precision: fp32 or a lower lr" if precision != "fp32" else "a lower lr or grad_clip"
        raise TrainingDiverged(f"training diverged: non-finite {what} at step {step} ({precision}); nothing after "
                               f"the last checkpoint was saved: set {hint} in the config (--resume continues "
                               "from that checkpoint)")


def clip_and_step(loss: torch.Tensor, net: torch.nn.Module, opt, scaler, clip: float | None) -> float:
    """Backward, clip the gradient norm to ``clip`` and step; the gradient norm is returned. A non-finite
    gradient skips the step (as a GradScaler does in fp16), so one overflowing batch cannot make the weights NaN."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(opt)
    gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip else math.inf))
    if not math.isfinite(gnorm) and not scaler.is_enabled():
        log.warning("non-finite gradient norm: optimizer step skipped")
        opt.zero_grad(set_to_none=True)
        return gnorm
    scaler.step(opt)
    scaler.update()
    return gnorm


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save`` of plain state dicts, tensors and numbers (loadable with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


TRAINER_STATE = ("optimizer", "optimizer_d", "lr_scheduler", "scaler")
"""Checkpoint entries a slim checkpoint leaves out (optimiser, LR-schedule and grad-scaler states)."""


def slim_checkpoint(src: Path, dst: Path) -> dict[str, Any]:
    """Write a slim copy of the training checkpoint ``src``: the EMA weights as both model and EMA (stored
    once), no `TRAINER_STATE`; step count, minutes, history, RNG and discriminator carry over. About a quarter
    of the size, to carry to a GPU machine. Resuming from it restarts Adam and its LR warm-up from the EMA
    weights (the resume logs it). Returns what was written."""
    st = load_checkpoint(Path(src))
    if st.get("ema") is None:
        raise MeddiffError(f"{src}: no EMA weights, nothing to slim to")
    slim = {k: v for k, v in st.items() if k not in TRAINER_STATE}
    slim["model"] = slim["ema"]  # the same tensors: torch.save writes them once
    slim["slim"] = True
    save_checkpoint(Path(dst), slim)
    return slim


def load_trainer_state(st: dict[str, Any], modules: dict[str, Any], stage: str) -> None:
    """Load the optimiser / LR-schedule / grad-scaler states ``modules`` (by checkpoint key) from ``st``; a slim
    checkpoint has none, and they start afresh (Adam from zero, the LR warm-up again)."""
    if st.get("slim"):
        log.info("%s: slim checkpoint (EMA weights, no optimiser state): Adam and the LR warm-up start afresh",
                 stage)
        return
    for key, module in modules.items():
        module.load_state_dict(st[key])


def load_widened(module: torch.nn.Module, state: dict[str, torch.Tensor],
                 channel_map: Callable[[int], int]) -> list[str]:
    """Load ``state`` into ``module``, where a tensor may have more input channels (dim 1) than in ``state``:
    its old channel ``i`` goes to ``channel_map(i)`` and the new channels start at zero, so the widened network
    computes what the old one did until training moves them. Returns the names of the widened tensors."""
    own = module.state_dict()
    if set(own) != set(state):
        raise MeddiffError(f"init_from: the checkpoint's network has other layers ({len(state)} tensors, this one "
                           f"{len(own)}); it must be the same architecture")
    widened, out = [], {}
    for name, new in own.items():
        old = state[name]
        if old.shape == new.shape:
            out[name] = old
            continue
        if old.ndim != new.ndim or old.ndim < 2 or old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:] \
                or old.shape[1] > new.shape[1]:
            raise MeddiffError(f"init_from: {name} is {tuple(old.shape)} in the checkpoint, {tuple(new.shape)} here; "
                               "only input channels can be added")
        grown = torch.zeros_like(new)
        for i in range(old.shape[1]):
            grown[:, channel_map(i)] = old[:, i]
        out[name] = grown
        widened.append(name)
    module.load_state_dict(out)
    return widened


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign file
        raise MeddiffError(f"cannot load checkpoint {path}: {exc}") from None


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "data": gen.get_state()}


def set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])


# --- budget / progress -------------------------------------------------------------------------------------


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

    def __enter__(self) -> "StopRequest":
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


def stop_agreed(dist: "Dist") -> bool:
    """After a loop left through ``STOP``: whether any rank was asked to stop (every rank calls this)."""
    return dist.any(STOP.requested)


def stopped(stage: str, step: int, path: Path, main: bool = True) -> TrainingStopped:
    """The exception that ends a stopped stage; only the main rank (``main``) logs the stop."""
    signum = STOP.signal or signal.SIGTERM  # a rank that got no signal stops with the one that did
    name = signal.Signals(signum).name if STOP.signal else "a stop on another rank"
    if main:
        log.warning("%s: %s stopped at step %d, checkpoint written", name, stage, step)
    return TrainingStopped(f"{stage} stopped at step {step} ({name}); checkpoint {path}: the same command with "
                           "--resume goes on from it", signum)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, mininterval=5.0,
                dynamic_ncols=True)


# --- pictures ------------------------------------------------------------------------------------------------


def middle_slices(x: np.ndarray) -> np.ndarray:
    """(H, W) picture of an image: itself (2D) or its three orthogonal middle slices side by side (3D)."""
    if x.ndim == 2:
        return np.rot90(x)
    a, b, c = (s // 2 for s in x.shape)
    views = [np.rot90(x[a]), np.rot90(x[:, b]), np.rot90(x[:, :, c])]
    h = max(v.shape[0] for v in views)
    return np.concatenate([np.pad(v, ((0, h - v.shape[0]), (0, 1))) for v in views], axis=1)


def save_grid(path: Path, rows: Iterable[Iterable[np.ndarray]], title: str = "", cmap: str = "gray",
              vmin: float = 0.0, vmax: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[middle_slices(np.asarray(im, np.float32)) for im in r] for r in rows]
    nr, nc = len(rows), max(len(r) for r in rows)
    h, w = rows[0][0].shape
    fig, axes = plt.subplots(nr, nc, figsize=(nc * 2.0 * w / h, nr * 2.0), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(nc):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_curve(path: Path, history: dict[str, list[tuple[int, float]]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in history.items():
        if not pts:
            continue
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        k = max(1, len(v) // 50)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v
        ax.plot(s[: len(smooth)] + (k - 1), smooth, label=name)
    ax.set_xlabel("step")
    if any(history.values()):
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)
