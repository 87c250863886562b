"""The CLI's lean MONAI import (issue 15, start-up): fewer modules, same volumes, a full import when needed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.runtime.lean_imports import HIDDEN_WHILE_IMPORTING_MONAI, LEAN_ENV

_CHILD = (
    "import json, sys; "
    "from napari_meddiff.runtime.lean_imports import import_monai_lean, HIDDEN_WHILE_IMPORTING_MONAI as H; "
    "lean = import_monai_lean(); "
    "from monai.networks.nets import AutoencoderKL, DiffusionModelUNet; "
    "from monai.networks.schedulers import DDIMScheduler; "
    "after = [m for m in H if m in sys.modules]; "
    "import importlib; "
    "ok = [m for m in H if importlib.util.find_spec(m.split('.')[0]) and importlib.import_module(m)]; "
    "print(json.dumps({'lean': lean, 'loaded_by_monai': after, 'importable_after': ok}))"
)


def _child(code: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name.split(".")[0]) is not None


def test_monai_imports_without_its_optional_plotting_and_table_libraries():
    out = _child(_CHILD)
    assert out["lean"] is True
    assert out["loaded_by_monai"] == []  # none of them came in with MONAI's networks and schedulers
    # ... and each installed one imports normally afterwards, in the same process
    assert out["importable_after"] == [m for m in HIDDEN_WHILE_IMPORTING_MONAI if _installed(m)]


def test_plain_import_when_turned_off():
    out = _child(_CHILD, **{LEAN_ENV: "0"})
    assert out["lean"] is False
    if _installed("pandas"):  # the point of the lean import: a plain one brings them in
        assert "pandas" in out["loaded_by_monai"]


def test_a_monai_that_needs_a_hidden_library_is_imported_whole(tmp_path):
    """If a MONAI version imports one of them without a fallback, the partial import is undone and redone."""
    fake = tmp_path / "monai"
    fake.mkdir()
    (fake / "__init__.py").write_text("import json\nNEEDS = json.dumps(1)\nimport pandas\n")
    if not _installed("pandas"):
        pytest.skip("pandas not installed")
    code = (
        "import sys; from napari_meddiff.runtime.lean_imports import import_monai_lean; import json; "
        "lean = import_monai_lean(); import monai; "
        "print(json.dumps({'lean': lean, 'pandas': 'pandas' in sys.modules and sys.modules['pandas'] is not None, "
        "'file': monai.__file__}))"
    )
    out = _child(code, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert out == {"lean": False, "pandas": True, "file": str(fake / "__init__.py")}


def test_generate_gives_the_same_volume_with_the_lean_import(tiny_models, tmp_path):
    """`meddiff generate` in a fresh process: the lean import changes start-up, not one voxel."""
    volumes = []
    for lean in ("1", "0"):
        out = tmp_path / f"lean{lean}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "napari_meddiff.cli",
                "generate",
                "--model",
                str(tiny_models["ldm3d"]),
                "--num",
                "1",
                "--seed",
                "3",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, LEAN_ENV: lean},
        )
        assert proc.returncode == 0, proc.stderr
        (nifti,) = sorted(out.glob("*.nii.gz"))
        img = nib.load(nifti)
        volumes.append((np.asarray(img.dataobj), img.affine))
    assert np.array_equal(volumes[0][0], volumes[1][0]) and np.array_equal(volumes[0][1], volumes[1][1])
