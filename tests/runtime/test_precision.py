"""Precision 'auto' (`runtime.precision`): bf16 where the CPU has it natively, else fp32; recorded per volume."""

from __future__ import annotations

import pytest
import torch

from napari_meddiff import MeddiffError, generate, load_model
from napari_meddiff.runtime.devices import native_bf16
from napari_meddiff.runtime.precision import resolve_precision


def test_precision_auto_resolves_by_hardware(tiny_models):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(MeddiffError, match="precision"):
        resolve_precision("fp8", cpu)
    model = load_model(tiny_models["ldm3d"])
    (vol,) = generate(model, [1], steps=2, precision="auto")
    assert vol.metadata["provenance"]["precision"] == resolve_precision("auto", cpu)
