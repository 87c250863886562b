"""Train a tiny model end to end in a few minutes on CPU: synthetic cohort -> training -> model folder -> samples.

    python examples/train_tiny.py                      # tiny pixel DDPM of axial slices (~2-5 min)
    python examples/train_tiny.py --kind ldm --minutes 4
    python examples/train_tiny.py --kind segmentation

Writes the cohort to ``out/tiny/cohort``, checkpoints/previews/loss curves to ``out/tiny/runs/<name>`` and the
model folder to ``out/tiny/models/<name>``, which ``meddiff generate --model out/tiny/models/<name>`` loads.
The same is available as ``meddiff train examples/train/tiny-ddpm-2d.yaml`` once the cohort exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CONFIGS = {"ddpm": "tiny-ddpm-2d.yaml", "ldm": "tiny-ldm-3d.yaml", "segmentation": "tiny-segdiff-2d.yaml"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=sorted(CONFIGS), default="ddpm")
    p.add_argument("--subjects", type=int, default=8, help="training subjects (train seeds 0..N-1)")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget (wall clock)")
    p.add_argument("--steps", type=int, default=None, help="cap on steps (default: the config's)")
    p.add_argument("--out", type=Path, default=Path("out/tiny"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.pipeline import segment_slices, train
    from napari_meddiff.training.reporting import save_grid

    t0 = time.time()
    cohort = args.out / "cohort"
    write_cohort(cohort, args.subjects, seed=0)
    print(f"cohort of {args.subjects} subjects in {cohort} ({time.time() - t0:.0f} s)")

    cfg = yaml.safe_load((HERE / "train" / CONFIGS[args.kind]).read_text())
    cfg["data"]["dir"] = str(cohort.resolve())
    config_path = args.out / CONFIGS[args.kind]
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    name = cfg["name"]
    model_dir = train(
        config_path,
        out=args.out / "models" / name,
        work_dir=args.out / "runs" / name,
        max_minutes=args.minutes,
        steps=args.steps,
        num_threads=args.threads,
    )

    model = load_model(model_dir)
    if model.kind == "segmentation":
        from napari_meddiff.training.data import load_dataset

        data = load_dataset({**model_train_cfg(config_path)}, progress=False)
        idx = list(range(0, len(data), max(1, len(data) // 4)))[:4]
        pred = segment_slices(model, data.images[idx], steps=model.config["defaults"]["steps"])
        rows = [
            [x[0].numpy() for x in data.images[idx]],
            [x.numpy() / 3 for x in data.labels[idx]],
            [x.numpy() / 3 for x in pred],
        ]
        title = "image / cohort labels / predicted labels"
    else:
        vols = generate(model, [0, 1, 2, 3], device="cpu")
        rows = [[v.array[..., 0] if model.spatial_dims == 2 else v.array for v in vols]]
        title = f"{name}: 4 samples"
    png = args.out / f"{name}_samples.png"
    save_grid(png, rows, title)
    print(f"model folder {model_dir}; samples {png}; total {time.time() - t0:.0f} s")
    if model.kind == "segmentation":
        print(
            f"next: meddiff segment --model {model_dir} --image {cohort}/sub-000000_T1w.nii.gz "
            f"--out {args.out / 'segmented'}"
        )
    else:
        print(f"next: meddiff generate --model {model_dir} --num 2 --out {args.out / 'generated'}")
    return 0


def model_train_cfg(config_path: Path) -> dict:
    from napari_meddiff.training.config import load_config

    return load_config(config_path)


if __name__ == "__main__":
    sys.exit(main())
