"""The steps every task shares: the model on its device, settings resolved from the model's defaults, and the
provenance each output records.

A task (`generate`, `inpaint`, `segment`) runs the same skeleton, as diffusers' pipelines do: check its inputs,
`resolve_settings`, `prepare_model`, run the one denoising loop, record `provenance`. Batch resume, the CLI and
the widgets ask the same `task_defaults`, so a default is decided in one place.
"""

from __future__ import annotations

from typing import Any

import torch

from napari_meddiff import __version__
from napari_meddiff.models import DiffusionModel, ModelConfigView, load_model
from napari_meddiff.runtime.devices import resolve_device
from napari_meddiff.runtime.precision import resolve_precision

TASKS = ("generate", "inpaint", "segment")
# Inpainting defaults per model kind, measured with benchmarks/bench_inpaint.py (results/inpaint_ddpm_settings.json,
# results/inpaint.json) on 6 held-out lesion subjects (lesion filling, MAE inside the mask):
# * brain-ddpm-2d (dpm++, 25 steps): 6.7 without resampling, 5.2 with jumps of 5 steps done twice (2x the
#   network evaluations), 5.2 done 5 times (5x), 5.4 with 3-step jumps 3 times, 5.6 with 50 steps -> (5, 2).
# * brain-ldm-3d: resampling did not help (10.0 vs 9.8) -> none. Feathering blends towards the original
#   inside the mask, i.e. towards the lesion when filling one: MAE 6.9 without, 9.8 with 2 voxels, 13.4 with
#   4 -> off by default (it is for insertions/repairs where the original at the border is valid tissue).
# A model folder may override these in model.json under "inpaint" (keys jump_length, jump_n,
# feather_voxels, sampler, steps).
DEFAULT_JUMP_LENGTH = {"ddpm": 5, "ldm": 5}
DEFAULT_JUMP_N = {"ddpm": 2, "ldm": 1}
DEFAULT_FEATHER = {"ddpm": 0, "ldm": 0}


def task_defaults(model: ModelConfigView, task: str) -> dict[str, Any]:
    """What ``task`` uses when a setting is not given: the model's sampling defaults (``defaults`` in its
    config over the package's), and for inpainting the RePaint jumps and feathering (``inpaint`` wins)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    out = dict(model.sampling_defaults)
    if task == "inpaint":
        out.update(
            jump_length=DEFAULT_JUMP_LENGTH.get(model.kind, 5),
            jump_n=DEFAULT_JUMP_N.get(model.kind, 1),
            feather_voxels=DEFAULT_FEATHER.get(model.kind, 0),
        )
        out.update(model.config.get("inpaint", {}))
    return out


def resolve_settings(
    model: ModelConfigView,
    task: str,
    device: torch.device,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    precision: str | None = None,
    **given: Any,
) -> dict[str, Any]:
    """The settings a task runs with: each given value, else the task's default for this model (``given``: the
    task's own settings by name, None for its default); ``precision`` ``auto`` resolved for ``device``. A sampler
    that does not fit the model's schedule (rflow for a DDPM model, or the reverse) is refused here, up front."""
    from napari_meddiff.diffusion.samplers import check_sampler

    defaults = task_defaults(model, task)
    check_sampler(sampler or defaults["sampler"], model.config["scheduler"], model.name)
    settings = {
        "sampler": sampler or defaults["sampler"],
        "steps": int(steps if steps is not None else defaults["steps"]),
        "eta": float(eta),
        "precision": resolve_precision(precision or defaults["precision"], device),
    }
    for name, value in given.items():
        settings[name] = value if value is not None else defaults.get(name)
    return settings


def prepare_model(model: str | DiffusionModel, device: str | torch.device) -> tuple[DiffusionModel, torch.device]:
    """The model (a name, a folder or a loaded model) on the resolved device."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if not isinstance(model, DiffusionModel):
        model = load_model(model, device=dev)
    elif model.device != dev:
        model.to(dev)
    return model, dev


def provenance(model: DiffusionModel, device: torch.device, **fields: Any) -> dict[str, Any]:
    """What an output records: the model and its weights' sha256, the task's fields (settings, seeds, ...) in
    the order given, the device and the package version; the caller adds ``seconds`` last. Weight files that
    differ from the ones their bundle publishes (fine-tuned) are named."""
    differ = getattr(model, "weights_differ_from_published", None)
    return {
        "model": model.name,
        "model_sha256": model.weights_sha256,
        **({"weights_differ_from_published": differ} if differ else {}),
        **fields,
        "device": str(device),
        "package_version": __version__,
    }
