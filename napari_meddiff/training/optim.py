"""Optimiser steps: EMA of the weights, warm-up schedule, gradient clipping, divergence checks."""

from __future__ import annotations

import copy
import logging
import math

import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.training.distributed import unwrap

log = logging.getLogger(__name__)


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


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


class TrainingDiverged(MeddiffError):
    """A loss or the data a stage trains on became non-finite (NaN or infinite)."""


def check_finite(value: torch.Tensor, what: str, step: int, precision: str) -> None:
    """Raise `TrainingDiverged` unless every element of ``value`` is finite."""
    if not bool(torch.isfinite(value).all()):
        hint = "precision: fp32 or a lower lr" if precision != "fp32" else "a lower lr or grad_clip"
        raise TrainingDiverged(
            f"training diverged: non-finite {what} at step {step} ({precision}); nothing after "
            f"the last checkpoint was saved: set {hint} in the config (--resume continues "
            "from that checkpoint)"
        )


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
