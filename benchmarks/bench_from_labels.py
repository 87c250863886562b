"""How good are scans generated from tissue maps (issue 39, item 4), on held-out cohort subjects.

For each held-out subject (seeds 100000..), its tissue map with its lesion painted in (label 4) goes through the
label-map model; the scan it gives is compared with the subject's real T1w on the same grid:

- **two-sample test**: the project's classifier test (`evaluate_models.two_sample_test`, a 2D CNN on axial slices,
  one decision per volume; 0.5: indistinguishable, 1.0: always told apart), generated against real scans;
- **label fidelity**: the shipped segmentation model (`brain-tissue-segdiff-2d`) on each generated scan against
  the input map (lesion counted as WM), Dice per tissue; beside it the same model on the subject's real scan
  against the same map, measured in the same run: the ceiling a perfect generator would reach;
- **lesion contrast**: mean intensity inside the lesion over that of the white matter 1-3 voxels around it, for
  generated and real scans of the lesion subjects;
- **seconds per volume** at the model's default settings (the user's path: `generate --labels` from the file,
  map resampled to the model's grid and the scan back onto the map's);
- a figure: real and generated scans at the same scale in three planes, the map's outline on the generated one.

    python benchmarks/bench_from_labels.py --model runs/t1w-from-labels/model --num 16 \
        --json benchmarks/results/from_labels.json --figure models/brain-t1w-from-labels-3d/samples.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import machine  # noqa: E402
from evaluate_models import two_sample_test  # noqa: E402

TISSUES = {1: "CSF", 2: "GM", 3: "WM"}


def held_out_items(model, folder: Path, num: int) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Real images ``(N, 1, *S)`` in the model's normalised units and their maps ``(N, *S)`` (lesions as 4) on
    the model's grid, as training preprocesses them, for the first ``num`` held-out subjects of ``folder``."""
    from napari_meddiff.data.mni152 import check_split
    from napari_meddiff.training.data import cohort_seeds, preprocess_subject

    data = {"labels_replace": ["_T1w", "_dseg"], "lesion_replace": ["_T1w", "_lesion"], "lesion_label": 4}
    files = sorted(folder.glob("sub-*_T1w.nii.gz"))[:num]
    check_split(cohort_seeds(folder, files), "heldout")  # evaluation only ever uses held-out subjects
    images, maps = [], []
    for f in files:
        im, lab = preprocess_subject(
            f, f.with_name(f.name.replace("_T1w", "_dseg")), 3, model.image_shape, model.voxel_size,
            model.config["intensity"], data,
        )  # fmt: skip
        images.append(im)
        maps.append(lab)
    return torch.from_numpy(np.concatenate(images)).float()[:, None], torch.from_numpy(np.concatenate(maps)), files


def generated(model, maps: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, float]:
    """One scan per map at the model's defaults, each from its own seed; and seconds per scan."""
    from napari_meddiff.diffusion.seeds import seeded_generators
    from napari_meddiff.tasks.from_labels import sample_from_label_arrays
    from napari_meddiff.tasks.settings import resolve_settings

    settings = resolve_settings(model, "generate", torch.device("cpu"))
    out, t0 = [], time.perf_counter()
    for m, seed in zip(maps, seeds):
        out.append(sample_from_label_arrays(model, m[None], seeded_generators([seed]), settings, torch.device("cpu")))
    return torch.cat(out)[:, None], (time.perf_counter() - t0) / len(seeds)


def user_path_seconds(model, dseg: Path) -> float:
    """Seconds for `generate --labels` from a file: the map resampled, the scan sampled and put back."""
    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.tasks.generate import generate

    labels = read_volume(dseg)
    t0 = time.perf_counter()
    generate(model, [0], labels=labels, device="cpu")
    return time.perf_counter() - t0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def tissue_dice(seg_model, images: torch.Tensor, maps: torch.Tensor, ensemble: int) -> list[dict[str, float]]:
    """Dice per tissue of the segmentation model's labels of each image against its map (lesion as WM)."""
    from napari_meddiff.io.volume import Volume
    from napari_meddiff.tasks.segment import segment

    out = []
    for image, lab in zip(images, maps):
        vol = Volume(image[0].numpy(), np.diag([2.0, 2.0, 2.0, 1.0]))
        seg = segment(seg_model, vol, ensemble=ensemble, device="cpu", window=(0.0, 1.0)).labels.array
        ref = np.where(lab.numpy() == 4, 3, lab.numpy())
        out.append({name: round(dice(seg == k, ref == k), 4) for k, name in TISSUES.items()})
    return out


def lesion_contrast(images: torch.Tensor, maps: torch.Tensor) -> list[float | None]:
    """Mean in the lesion over mean in the WM 1-3 voxels around it (None: no lesion)."""
    out: list[float | None] = []
    for image, lab in zip(images, maps):
        lesion = lab.numpy() == 4
        if not lesion.any():
            out.append(None)
            continue
        ring = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(lesion) & (lab.numpy() == 3)
        img = image[0].numpy()
        out.append(round(float(img[lesion].mean() / max(img[ring].mean(), 1e-6)), 4))
    return out


PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def show_plane(ax, vol: np.ndarray, lab: np.ndarray | None, cut: int, index: int, title: str) -> None:
    """One plane of a scan in [0, 1] (grey, voxels as squares), the map's tissue borders outlined when given."""
    ax.imshow(np.take(vol, index, axis=cut).T, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    if lab is not None:
        outline = np.take(lab, index, axis=cut).T
        ax.contour(outline, levels=[1.5, 2.5, 3.5], colors=["#ffd000", "#00c0ff", "#ff3030"], linewidths=0.4)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_grid_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_figure(path: Path, real: torch.Tensor, fake: torch.Tensor, maps: torch.Tensor, title: str) -> None:
    """Per subject: the real scan and the generated one (map outline in colour), axial/coronal/sagittal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(3, len(real))
    fig, axes = plt.subplots(2 * rows, 3, figsize=(9, 6.2 * rows), squeeze=False)
    for r in range(rows):
        c = [s // 2 for s in real.shape[2:]]
        lesion = np.argwhere(maps[r].numpy() == 4)
        if len(lesion):
            c = [int(v) for v in lesion.mean(0)]
        for k, (name, cut) in enumerate(PLANES):
            for j, (what, vol) in enumerate((("real", real[r, 0]), ("generated", fake[r, 0]))):
                lab = maps[r].numpy() if what == "generated" else None
                show_plane(axes[2 * r + j][k], vol.numpy(), lab, cut, c[cut], f"subject {r + 1} {what}: {name}")
    save_grid_figure(fig, path, title)


def main(argv=None) -> int:
    from napari_meddiff.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="brain-t1w-from-labels-3d")
    p.add_argument("--segmentation-model", default="brain-tissue-segdiff-2d")
    p.add_argument("--heldout", type=Path, default=ROOT / "data" / "cohort-2mm-heldout")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--ensemble", type=int, default=1, help="segmentation ensemble members (label fidelity)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    args = p.parse_args(argv)
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, write_cohort

    write_cohort(args.heldout, args.num, seed=HELDOUT_SEEDS.start, progress=False)  # kept when already there
    model = load_model(args.model, device="cpu")
    real, maps, files = held_out_items(model, args.heldout, args.num)
    fake, seconds = generated(model, maps, [HELDOUT_SEEDS.start + i for i in range(len(files))])
    res = {"model": str(args.model), "subjects": [f.name for f in files], "machine": machine()}
    res["seconds_per_volume_on_grid"] = round(seconds, 2)
    res["seconds_per_volume_from_file"] = round(user_path_seconds(model, files[0].with_name(
        files[0].name.replace("_T1w", "_dseg"))), 2)  # fmt: skip
    res["two_sample"] = two_sample_test(real, fake)
    seg_model = load_model(args.segmentation_model, device="cpu")
    for name, images in (("generated", fake), ("real", real)):
        per = tissue_dice(seg_model, images, maps, args.ensemble)
        res[f"dice_{name}"] = {t: round(float(np.mean([d[t] for d in per])), 4) for t in TISSUES.values()}
        res[f"lesion_contrast_{name}"] = lesion_contrast(images, maps)
    res["segmentation"] = {"model": args.segmentation_model, "ensemble": args.ensemble}
    print(json.dumps({k: v for k, v in res.items() if k != "subjects"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.figure:
        acc = res["two_sample"]["accuracy"]
        title = f"{model.name}: held-out subjects, real (top) and generated from their maps; two-sample acc {acc}"
        save_figure(args.figure, real, fake, maps, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
