"""npe2 sample data: the MNI152 T1 template (nilearn) and a brain generated with the 4 mm LDM (quick)."""

from __future__ import annotations

import numpy as np

from napari_meddiff._napari.layers import LayerDataTuple, volume_to_layer_data
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DEFAULT_INPAINT_MODEL, available_models, find_model_dir, read_config

# a quick look in the foreground (~2 s): the 4 mm LDM; the two-stage default takes ~35 s, a Generate widget's run
SAMPLE_MODEL = DEFAULT_INPAINT_MODEL  # tests point this at a tiny model folder
SAMPLE_SEED = 0
SAMPLE_MAX_STEPS = 10  # a quick look; the Generate widget runs the model's full default


def volume_from_nibabel(img) -> Volume:
    """A `Volume` from an in-memory nibabel NIfTI image (scaling applied, as `read_volume` does)."""
    data = np.asanyarray(img.dataobj)
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)  # file-backed only
    if slope not in (1, None) or inter not in (0, None) or data.dtype.kind == "f":
        data = data.astype(np.float32)
    qform, qcode = img.get_qform(coded=True)
    _, scode = img.get_sform(coded=True)
    meta = {
        "format": "nifti1",
        "qform_code": int(qcode),
        "sform_code": int(scode),
        "qform": None if qform is None else np.asarray(qform).tolist(),
        "descrip": img.header["descrip"].tobytes().rstrip(b"\x00").decode("latin-1", "replace"),
        "original_dtype": str(img.get_data_dtype()),
    }
    return Volume(np.ascontiguousarray(data), img.affine.copy(), meta)


def mni152_t1() -> list[LayerDataTuple]:
    """MNI152 T1 template at 2 mm (ships with nilearn; no download)."""
    from nilearn.datasets import load_mni152_template

    vol = volume_from_nibabel(load_mni152_template(resolution=2))
    vol.metadata["source_path"] = "nilearn MNI152 template (2 mm)"
    return [volume_to_layer_data(vol, "MNI152_T1_2mm", layer_type="image")]


def _sample_model() -> str:
    """`SAMPLE_MODEL` when installed, else the first generative model found (3D first)."""
    try:
        return str(find_model_dir(SAMPLE_MODEL))
    except MeddiffError:
        pass
    configs = {name: read_config(path) for name, path in available_models().items()}
    generative = sorted(
        (name for name, c in configs.items() if c["kind"] in ("ddpm", "ldm")), key=lambda n: -configs[n]["spatial_dims"]
    )
    if not generative:
        raise MeddiffError("no generative model is installed: put a model folder under models/ or in $MEDDIFF_MODELS")
    return generative[0]


def synthetic_brain() -> list[LayerDataTuple]:
    """One brain from `SAMPLE_MODEL` (seed 0, at most 10 steps), generated in the foreground."""
    from napari_meddiff.runtime.threads import configure_waiting, use_free_cores

    configure_waiting()  # before torch loads, as the CLI
    from napari_meddiff.models import load_model
    from napari_meddiff.runtime.devices import resolve_device
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.tasks.settings import task_defaults

    use_free_cores()  # as the CLI: napari's event loop waits for this one anyway
    device = resolve_device("auto")
    model = load_model(_sample_model(), device=device)
    steps = min(int(task_defaults(model, "generate")["steps"]), SAMPLE_MAX_STEPS)
    (vol,) = generate(model, [SAMPLE_SEED], steps=steps, device=str(device))
    name = f"{model.name}_seed{SAMPLE_SEED}"
    return [volume_to_layer_data(vol, name, layer_type="image", contrast_limits=(0.0, 1.0))]
