"""Train a 2D pixel DDPM on one class of MedNIST (64x64 JPEGs, e.g. HeadCT), fetched with ``monai.apps``.

    python examples/train_mednist.py --root ~/data --download --class-name HeadCT --minutes 30
    meddiff generate --model models/mednist-headct-ddpm --num 4 --out out/mednist

Needs internet once (``--download``; ~60 MB). The images become 2D NIfTI files (1 mm pixels) in
``<root>/mednist-<class>-nifti``, which a normal training config then reads like any folder of NIfTI images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def prepare_mednist(
    root: Path,
    out_dir: Path,
    class_name: str = "HeadCT",
    section: str = "training",
    download: bool = False,
    max_images: int | None = None,
) -> Path:
    """MedNIST JPEGs of one class -> ``out_dir/img-XXXXX.nii.gz`` (64x64x1, 1 mm); returns ``out_dir``."""
    from monai.apps import MedNISTDataset
    from PIL import Image

    from napari_meddiff.io.volume import Volume, write_volume

    root.mkdir(parents=True, exist_ok=True)
    ds = MedNISTDataset(root_dir=root, section=section, download=download, seed=0, cache_rate=0.0, progress=False)
    items = [d for d in ds.data if d["class_name"] == class_name]
    if not items:
        classes = sorted({d["class_name"] for d in ds.data})
        raise SystemExit(f"no MedNIST images of class {class_name!r}; classes: {', '.join(classes)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(items[:max_images]):
        arr = np.asarray(Image.open(d["image"]).convert("L"), dtype=np.float32).T[:, ::-1]  # rows -> (x, y) RAS-ish
        vol = Volume.from_spacing(np.ascontiguousarray(arr)[..., None], (1.0, 1.0, 1.0))
        write_volume(vol, out_dir / f"img-{i:05d}.nii.gz", overwrite=True)
    return out_dir


def mednist_config(name: str, data_dir: Path, minutes: float) -> dict:
    return {
        "name": name,
        "kind": "ddpm",
        "description": f"Pixel DDPM of MedNIST images ({data_dir.name}).",
        "spatial_dims": 2,
        "image_shape": [64, 64],
        "voxel_size": [1.0, 1.0],
        "intensity": {"method": "percentile", "lower": 0.0, "upper": 100.0, "foreground_only": False},
        "data": {
            "dir": str(data_dir),
            "images": "img-*.nii.gz",
            "val_subjects": 8,
            "slice_thickness": 1.0,
            "min_brain_fraction": 0.0,
            "flip": False,
        },
        "networks": {
            "unet": {
                "channels": [32, 64, 64],
                "attention_levels": [False, False, True],
                "num_res_blocks": 1,
                "num_head_channels": 64,
                "norm_num_groups": 32,
            }
        },
        "defaults": {"sampler": "dpm++", "steps": 25, "precision": "fp32"},
        "training": {"max_minutes": minutes, "batch_size": 32, "lr": 2.5e-4, "val_every": 500},
    }


def main(argv=None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="where MedNIST is (or is downloaded to)")
    p.add_argument("--download", action="store_true", help="download MedNIST with monai.apps (needs internet)")
    p.add_argument("--class-name", default="HeadCT", help="AbdomenCT, BreastMRI, CXR, ChestCT, Hand or HeadCT")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=None, help="model folder (default models/mednist-<class>-ddpm)")
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args(argv)
    data_dir = prepare_mednist(
        args.root,
        args.root / f"mednist-{args.class_name.lower()}-nifti",
        args.class_name,
        download=args.download,
        max_images=args.max_images,
    )
    name = f"mednist-{args.class_name.lower()}-ddpm"
    cfg_path = data_dir.parent / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(mednist_config(name, data_dir, args.minutes), sort_keys=False))
    print(f"data in {data_dir}; config {cfg_path}")
    if args.prepare_only:
        return 0
    from napari_meddiff.training.pipeline import train

    train(cfg_path, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
