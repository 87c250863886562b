"""A bundle's scheduler (MONAI's DDPM, DDIM or rectified-flow class and its arguments) as this package's
``scheduler`` block, MONAI's class defaults filled in where the bundle leaves them out."""

from __future__ import annotations

import inspect
from typing import Any

from napari_meddiff.models.schema import RFLOW_FIELDS


def bundle_schedule(cls_name: str | None, kwargs: dict, from_scripts: bool = False) -> dict[str, Any]:
    """A bundle scheduler's arguments -> this package's schedule dict (``from_scripts``: the bundle's own copy of
    the class, in ``scripts/``, whose defaults may differ from MONAI's)."""
    from monai.networks import schedulers

    if cls_name == "RFlowScheduler":
        return rflow_schedule(kwargs, from_scripts)
    cls = getattr(schedulers, cls_name or "DDPMScheduler")
    params = inspect.signature(cls.__init__).parameters
    # as the bundle gives them: the schema then judges them, naming the bundle's config (int(1e12) or bool("no")
    # would pass a wrong value on)
    keys = ("num_train_timesteps", "schedule", "prediction_type", "clip_sample")
    schedule = {key: kwargs.get(key, params[key].default) for key in keys}
    for key in ("beta_start", "beta_end"):
        if key in kwargs:
            schedule[key] = kwargs[key]
    return schedule


def rflow_schedule(kwargs: dict, from_scripts: bool = False) -> dict[str, Any]:
    """A rectified flow's schedule block: the bundle's RFlowScheduler arguments over MONAI's defaults (MAISI's
    ``scripts/rectified_flow.py`` copy defaults to continuous time, as its code does)."""
    from monai.networks.schedulers import RFlowScheduler

    params = inspect.signature(RFlowScheduler.__init__).parameters
    defaults = {key: params[key].default for key in RFLOW_FIELDS if key in params}
    if from_scripts:
        defaults["use_discrete_timesteps"] = False
    schedule = {"type": "rflow", "num_train_timesteps": kwargs.get("num_train_timesteps", 1000)}
    schedule.update({key: kwargs.get(key, default) for key, default in defaults.items()})
    return schedule
