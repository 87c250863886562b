"""Shared training machinery: devices/precision, torchrun data parallel, EMA, checkpoints, learning-rate
warm-up, progress, PNG previews and loss curves."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from napari_meddiff.errors import MeddiffError

log = logging.getLogger(__name__)


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
        log.info("%s: slim checkpoint (EMA weights, no optimiser state): Adam and the LR warm-up start afresh", stage)
        return
    for key, module in modules.items():
        module.load_state_dict(st[key])


def load_widened(
    module: torch.nn.Module, state: dict[str, torch.Tensor], channel_map: Callable[[int], int]
) -> list[str]:
    """Load ``state`` into ``module``, where a tensor may have more input channels (dim 1) than in ``state``:
    its old channel ``i`` goes to ``channel_map(i)`` and the new channels start at zero, so the widened network
    computes what the old one did until training moves them. Returns the names of the widened tensors."""
    own = module.state_dict()
    if set(own) != set(state):
        raise MeddiffError(
            f"init_from: the checkpoint's network has other layers ({len(state)} tensors, this one "
            f"{len(own)}); it must be the same architecture"
        )
    widened, out = [], {}
    for name, new in own.items():
        old = state[name]
        if old.shape == new.shape:
            out[name] = old
            continue
        if (
            old.ndim != new.ndim
            or old.ndim < 2
            or old.shape[0] != new.shape[0]
            or old.shape[2:] != new.shape[2:]
            or old.shape[1] > new.shape[1]
        ):
            raise MeddiffError(
                f"init_from: {name} is {tuple(old.shape)} in the checkpoint, {tuple(new.shape)} here; "
                "only input channels can be added"
            )
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
