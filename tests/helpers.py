"""Helpers shared by test files in several folders (fixtures live in ``conftest.py``).

Import them as ``from tests.helpers import ...``: ``tests`` is a package, so pytest puts the repository root on
``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from napari_meddiff.models import build_network, save_model_folder
from napari_meddiff.testing.tiny_models import TINY_SCHEDULE, tiny_unet_config

REPO = Path(__file__).resolve().parent.parent  # the checkout: benchmarks/, examples/, models/ beside napari_meddiff/


# --- the `meddiff` command in a fresh process -----------------------------------------------------------------------


def run_cli(*args, env=None, umask=None) -> subprocess.CompletedProcess:
    """``python -m napari_meddiff.cli ARGS`` (arguments through ``str``), optionally under ``umask``."""
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", "napari_meddiff.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=pre,
    )


def assert_one_line_error(proc, message: str) -> None:
    """A failed command that printed one ``meddiff: error:`` line holding ``message``, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("meddiff: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


# --- files --------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to check that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_nifti(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    """``array`` as float32 NIfTI with an axis-aligned affine of ``spacing`` mm."""
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


# --- training ---------------------------------------------------------------------------------------------------------


def tiny_train_config(tmp_path: Path) -> Path:
    """A 2-step 2D DDPM training config written to ``tmp_path/t.yaml``; its data folder is not created."""
    cfg = {
        "name": "t-ddpm",
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [10.0, 10.0],
        "data": {"dir": str(tmp_path / "no-data-needed")},
        "networks": {
            "unet": {
                "channels": [8, 16],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 8,
            }
        },
        "training": {"steps": 2, "batch_size": 2},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- a conditional model ----------------------------------------------------------------------------------------------

CONDITIONS = [
    {
        "name": "age",
        "low": 0.0,
        "high": 1.0,
        "default": 0.5,
        "description": "age, scaled",
        "unit": "years",
        "unit_low": 20.0,
        "unit_high": 90.0,
    },
    {"name": "lesion_load", "low": -1.0, "high": 1.0, "default": 0.0},
]


def conditional_model(folder, *, concat=True, context=True, class_labels=False, null=(-1.0, -1.0)):
    """A tiny pixel DDPM of this package's format whose model.json declares two conditions."""
    torch.manual_seed(0)
    unet = tiny_unet_config(2, 1 + (2 if concat else 0), 1)
    if context:
        unet.update(with_conditioning=True, cross_attention_dim=2, attention_levels=[False, True])
    if class_labels:
        unet["num_class_embeds"] = 3
    conditions = CONDITIONS[:1] if class_labels else CONDITIONS
    if class_labels:
        conditions = [{"name": "grade", "low": 0, "high": 2, "default": 1}]
        null = None
    config = {
        "name": folder.name,
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [2.0, 2.0],
        "scheduler": TINY_SCHEDULE,
        "networks": {"unet": unet},
        "defaults": {"sampler": "ddim", "steps": 3, "precision": "fp32"},
        "conditioning": {
            "concat": concat,
            "context": context,
            "class_labels": class_labels,
            "null": list(null) if null else None,
            "conditions": conditions,
        },
    }
    net = build_network("unet", unet)
    with torch.no_grad():
        for p in net.parameters():  # MONAI zero-initialises the output convolution
            p.add_(torch.randn_like(p) * 0.05)
    return save_model_folder(folder, config, {"unet": net}, card="# conditional test model\n", overwrite=True)
