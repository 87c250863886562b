"""What a model is conditioned on, turned into UNet inputs: extra image channels or cross-attention context."""

from __future__ import annotations

import dataclasses

import torch

from napari_meddiff.choices import AUTOENCODER_PASS_ENV, AUTOENCODER_PASSES, PRECISION_CHOICES, PRECISIONS  # noqa: F401
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import DiffusionModel
from napari_meddiff.models.conditions import Conditioning


@dataclasses.dataclass
class ConditionInputs:
    """A batch's condition values as the UNet takes them (see `napari_meddiff.models.Conditioning`)."""

    channels: torch.Tensor | None = None  # (B, N, *spatial), concatenated to the input
    context: torch.Tensor | None = None  # (B, 1, N), cross-attention
    class_labels: torch.Tensor | None = None  # (B,), long

    def cat(self, other: ConditionInputs) -> ConditionInputs:
        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return ConditionInputs(
            join(self.channels, other.channels),
            join(self.context, other.context),
            join(self.class_labels, other.class_labels),
        )


def condition_inputs(model: DiffusionModel, values: torch.Tensor | None, x: torch.Tensor) -> ConditionInputs:
    """Condition values ``(B, N)`` -> the UNet's extra channels / context / class labels for samples ``x``."""
    how = model.conditioning
    if not how.used:
        if values is not None and values.numel():
            raise MeddiffError(f"{model.name} takes no conditions")
        return ConditionInputs()
    if values is None:  # the model's defaults, e.g. for inpainting with a conditional model
        defaults = [s.default for s in model.conditions]
        values = torch.tensor(defaults, dtype=torch.float32).expand(x.shape[0], len(defaults))
    if values.ndim != 2 or values.shape != (x.shape[0], len(model.conditions)):
        raise MeddiffError(f"conditions must be ({x.shape[0]}, {len(model.conditions)}), got {tuple(values.shape)}")
    return network_conditions(how, values, x)


def network_conditions(how: Conditioning, values: torch.Tensor, x: torch.Tensor) -> ConditionInputs:
    """Checked condition values ``(B, N)`` in the form ``how`` says the UNet takes them, for inputs ``x``
    (sampling and training alike)."""
    values = values.to(device=x.device, dtype=torch.float32)
    spatial = x.shape[2:]
    channels = (
        values.reshape(*values.shape, *[1] * len(spatial)).expand(*values.shape, *spatial) if how.concat else None
    )
    context = values.unsqueeze(1) if how.context else None
    labels = values[:, 0].round().long() if how.class_labels else None
    return ConditionInputs(channels, context, labels)


def unet_inputs(net_in: torch.Tensor, cond: ConditionInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(input with the condition channels concatenated, the UNet's context / class-label keyword arguments)."""
    if cond.channels is not None:
        net_in = torch.cat([net_in, cond.channels.to(net_in.dtype)], dim=1)
    kwargs = {}
    if cond.context is not None:
        kwargs["context"] = cond.context
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    return net_in, kwargs
