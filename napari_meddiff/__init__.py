"""napari-meddiff: DDPM and latent diffusion models for 3D medical images (NIfTI), in napari and on the CLI.

The public API (``import napari_meddiff as md``): `read_volume` / `write_volume` and `Volume` (``io``),
`load_model` / `available_models` (``models``), the tasks `generate`, `inpaint`, `segment` (``tasks``;
`changed_labels_mask`: what an edit of a label map changed, for inpainting under the new map) and
`audit` (``audit``: memorization, diversity and fidelity of a synthetic set).
Subpackages: ``io``, ``models``, ``diffusion``, ``autoencoder``, ``tasks``, ``runtime``, ``data``,
``training``, ``review``, ``audit``, ``testing``; the shells ``cli`` and ``_napari``.
"""

from __future__ import annotations

import importlib

from napari_meddiff.errors import Cancelled, MeddiffError

__version__ = "0.1.0"

# The tasks import torch and MONAI (seconds): they load on first use, so `meddiff --help`, `meddiff models`
# and napari's plugin discovery do not pay for them.
_LAZY = {
    "Volume": "io.volume",
    "read_volume": "io.volume",
    "write_volume": "io.volume",
    "available_models": "models",
    "load_model": "models",
    "generate": "tasks.generate",
    "inpaint": "tasks.inpaint",
    "changed_labels_mask": "tasks.from_labels",
    "segment": "tasks.segment",
    "audit": "audit",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from napari_meddiff.runtime.threads import configure_waiting

    configure_waiting()  # before the tasks import torch: OpenMP threads sleep at barriers
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Cancelled",
    "MeddiffError",
    "Volume",
    "audit",
    "available_models",
    "changed_labels_mask",
    "generate",
    "inpaint",
    "load_model",
    "read_volume",
    "segment",
    "write_volume",
    "__version__",
]
