"""napari-meddiff: DDPM and latent diffusion models for 3D medical images (NIfTI), in napari and on the CLI."""

from __future__ import annotations

__version__ = "0.1.0"

import sys  # noqa: E402
import types  # noqa: E402

from .threads import configure_waiting as _configure_waiting  # noqa: E402

_configure_waiting()  # OpenMP threads sleep at barriers: set before anything imports torch

from .errors import Cancelled, MeddiffError  # noqa: E402

# The tasks import torch and MONAI (seconds): they load on first use, so `meddiff --help`, `meddiff models`
# and napari's plugin discovery do not pay for them.
_LAZY = {
    "Volume": "volume", "read_volume": "volume", "write_volume": "volume",
    "available_models": "zoo", "load_model": "zoo",
    "generate": "generate", "inpaint": "inpaint", "segment": "segment",
}


class _Package(types.ModuleType):
    """Keeps ``napari_meddiff.generate`` (and inpaint, segment) the task function, as an eager
    ``from .generate import generate`` did: importing the submodule would otherwise rebind the name to it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _TASKS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_TASKS = ("generate", "inpaint", "segment")
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
