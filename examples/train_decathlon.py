"""Train on a Medical Segmentation Decathlon task fetched with ``monai.apps.DecathlonDataset``.

    python examples/train_decathlon.py --root ~/data --download --task Task01_BrainTumour --kind ldm --minutes 60
    python examples/train_decathlon.py --root ~/data --task Task01_BrainTumour --kind segmentation

Needs internet once (``--download``; Task01 is ~7 GB). One channel of each (possibly 4D) image is written as a
3D NIfTI ``<case>_img.nii.gz`` (labels ``<case>_seg.nii.gz``) in ``<root>/<task>-nifti``; a training config
for ``--kind`` (``ldm``: 3D latent diffusion at 4 mm; ``ddpm``: axial 2D slices; ``segmentation``: 2D
image-conditioned label diffusion over the task's classes) is written next to it and trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np


def prepare_decathlon(
    root: Path, task: str, out_dir: Path, channel: int = 0, download: bool = False, max_cases: int | None = None
) -> tuple[Path, list[str]]:
    """Decathlon training cases -> 3D NIfTI image/label pairs; returns (out_dir, class names)."""
    from monai.apps import DecathlonDataset

    from napari_meddiff.io.volume import read_volume, write_volume

    root.mkdir(parents=True, exist_ok=True)
    ds = DecathlonDataset(
        root_dir=root,
        task=task,
        section="training",
        download=download,
        seed=0,
        val_frac=0.0,
        cache_rate=0.0,
        progress=False,
    )
    props = json.loads((root / task / "dataset.json").read_text())
    classes = [props["labels"][k] for k in sorted(props["labels"], key=int)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in ds.data[:max_cases]:
        case = Path(d["image"]).name.split(".nii")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "4D, using volume N": that is the point
            img = read_volume(d["image"], frame=channel) if _is_4d(d["image"]) else read_volume(d["image"])
        write_volume(img, out_dir / f"{case}_img.nii.gz", overwrite=True)
        lab = read_volume(d["label"])
        write_volume(
            lab.with_array(np.asarray(lab.array).astype(np.uint8)),
            out_dir / f"{case}_seg.nii.gz",
            kind="labels",
            overwrite=True,
        )
    return out_dir, classes


def _is_4d(path: str) -> bool:
    import nibabel as nib

    return len(nib.load(path).shape) == 4


def decathlon_config(name: str, kind: str, data_dir: Path, classes: list[str], minutes: float) -> dict:
    data = {"dir": str(data_dir), "images": "*_img.nii.gz", "labels_replace": ["_img", "_seg"], "val_subjects": 2}
    sched = {"defaults": {"sampler": "dpm++", "steps": 25, "precision": "fp32"}}
    unet2d = {
        "channels": [32, 64, 64],
        "attention_levels": [False, False, True],
        "num_res_blocks": 1,
        "num_head_channels": 64,
        "norm_num_groups": 32,
    }
    if kind == "ldm":
        return {
            "name": name,
            "kind": "ldm",
            "spatial_dims": 3,
            "image_shape": [48, 56, 48],
            "voxel_size": [4.0] * 3,
            "data": data,
            **sched,
            "networks": {
                "autoencoder": {
                    "channels": [16, 32, 32],
                    "latent_channels": 4,
                    "num_res_blocks": [1, 1, 1],
                    "attention_levels": [False, False, False],
                    "norm_num_groups": 16,
                    "with_encoder_nonlocal_attn": False,
                    "with_decoder_nonlocal_attn": False,
                },
                "unet": {
                    "channels": [48, 96],
                    "attention_levels": [False, True],
                    "num_res_blocks": 1,
                    "num_head_channels": 48,
                    "norm_num_groups": 16,
                },
            },
            "autoencoder_training": {"max_minutes": minutes / 2, "batch_size": 2, "patch_size": [32, 32, 32]},
            "training": {"max_minutes": minutes / 2, "batch_size": 8},
        }
    cfg = {
        "name": name,
        "kind": kind,
        "spatial_dims": 2,
        "image_shape": [64, 64],
        "voxel_size": [3.0, 3.0],
        "data": {**data, "slice_thickness": 3.0, "min_brain_fraction": 0.1},
        **sched,
        "networks": {"unet": unet2d},
        "training": {"max_minutes": minutes, "batch_size": 16},
    }
    if kind == "segmentation":
        cfg["segmentation"] = {"num_classes": len(classes), "class_names": classes}
    return cfg


def main(argv=None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--task", default="Task01_BrainTumour")
    p.add_argument("--download", action="store_true", help="download the task with monai.apps (needs internet)")
    p.add_argument(
        "--channel", type=int, default=0, help="channel of 4D images (Task01: 0 FLAIR, 1 T1w, 2 T1gd, 3 T2w)"
    )
    p.add_argument("--kind", choices=["ldm", "ddpm", "segmentation"], default="ldm")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args(argv)
    data_dir, classes = prepare_decathlon(
        args.root,
        args.task,
        args.root / f"{args.task}-nifti",
        args.channel,
        download=args.download,
        max_cases=args.max_cases,
    )
    name = f"{args.task.split('_', 1)[-1].lower()}-{args.kind}"
    cfg_path = data_dir.parent / f"{name}.yaml"
    cfg_path.write_text(
        yaml.safe_dump(decathlon_config(name, args.kind, data_dir, classes, args.minutes), sort_keys=False)
    )
    print(f"data in {data_dir}; config {cfg_path}")
    if args.prepare_only:
        return 0
    from napari_meddiff.training.pipeline import train

    train(cfg_path, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
