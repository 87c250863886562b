"""napari-meddiff: DDPM and latent diffusion models for 3D medical images (NIfTI), in napari and on the CLI."""

from __future__ import annotations

__version__ = "0.1.0"

from .threads import configure_waiting as _configure_waiting  # noqa: E402

_configure_waiting()  # OpenMP threads sleep at barriers: set before anything imports torch

from .errors import Cancelled, MeddiffError  # noqa: E402
from .volume import Volume, read_volume, write_volume  # noqa: E402
from .zoo import available_models, load_model  # noqa: E402
from .generate import generate  # noqa: E402
from .inpaint import inpaint  # noqa: E402
from .segment import segment  # noqa: E402

__all__ = [
    "Cancelled",
    "MeddiffError",
    "Volume",
    "available_models",
    "generate",
    "inpaint",
    "load_model",
    "read_volume",
    "segment",
    "write_volume",
    "__version__",
]
