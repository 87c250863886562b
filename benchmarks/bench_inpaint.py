"""Lesion filling: our inpainting against two classical fills, on held-out synthetic subjects; cost at 256^3.

    OMP_NUM_THREADS=1 python benchmarks/bench_inpaint.py [--subjects 6] [--candidates 2] [--ddpm brain-ddpm-2d]
        [--ldm brain-ldm-3d] [--ddpm-settings default jump_n=1] [--ldm-settings default feather_voxels=2 ...]
    python benchmarks/bench_inpaint.py --tiny        # a quick run of the script itself on tiny random models

Quality: held-out cohort subjects (`cohort.HELDOUT_SEEDS`, 2 mm) with a synthetic lesion, whose lesion-free
image is known. The mask is the lesion mask dilated by ``--dilate`` voxels (what a reader would paint: the
lesion and its blurred rim). Inside the mask, each method's fill is compared with the lesion-free truth:
MAE and PSNR (peak = the truth's 0.5-99.5 % foreground intensity range, the models' window), and a texture
ratio (high-pass std of the fill / of the truth, 2+ voxels inside the mask: 0 = smooth, 1 = the truth's
texture and noise). A sample from a good model is not the mean of the posterior: expect a smooth fill to win on MAE/PSNR
and lose on texture; the mean of several candidates estimates the posterior mean. Methods:

* ``lesion (no fill)``: the input itself, for scale;
* ``shell mean``: the mask filled with the mean of a 2-voxel shell of tissue around it;
* ``gaussian fill``: iterative Gaussian diffusion fill (SimpleITK ``SmoothingRecursiveGaussian``, known voxels
  reset after every pass: converges to a smooth harmonic interpolation of the border);
* each model with each setting given (RePaint jumps for the pixel model, feathering for the latent one),
  ``--candidates`` candidates per subject (seeds 0..K-1): the metrics averaged over candidates, and the
  voxel-wise mean of the candidates as one more fill ("mean of K").

Every fill is checked to leave the voxels outside the mask exactly as they were.

Cost: a 256^3 1 mm volume (a subject resampled) with a 20^3 mask in white matter, inpainted by each model in a
fresh process: wall time, RSS before inpainting (imports, image, mask and model loaded) and the highest RSS
during it (sampled every 5 ms), so ``rss_added_mb`` is what inpainting itself costs.

On a shared, loaded machine run it with ``OMP_NUM_THREADS=1``: with 2 threads per process against other
work, a 25-step fill took ~80 s instead of ~4 s here.

Writes ``results/inpaint.json`` (``results/inpaint_tiny.json`` with ``--tiny``) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, table  # noqa: E402

from napari_meddiff import Volume, load_model  # noqa: E402
from napari_meddiff.tasks.inpaint import inpaint  # noqa: E402

# --- classical fills -------------------------------------------------------------------------------


def shell(mask: np.ndarray, width: int = 2) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=width) & ~mask


def shell_mean_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask] = image[shell(mask)].mean()
    return out


def gaussian_fill(
    image: np.ndarray, mask: np.ndarray, affine: np.ndarray, sigma_mm: float = 2.0, passes: int = 200
) -> np.ndarray:
    """Iterative Gaussian diffusion fill on the mask's bounding box (plus margin), SimpleITK smoothing."""
    import SimpleITK as sitk

    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 6, 0)
    hi = np.minimum(idx.max(0) + 7, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop, m = image[box].astype(np.float32), mask[box]
    x = shell_mean_fill(crop, m)
    spacing = [float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))][::-1]
    for _ in range(passes):
        img = sitk.GetImageFromArray(np.transpose(x, (2, 1, 0)))
        img.SetSpacing(spacing)
        smooth = np.transpose(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm)), (2, 1, 0))
        x = np.where(m, smooth, crop)
    out = image.copy()
    out[box] = x
    return out


# --- metrics ---------------------------------------------------------------------------------------


def high_pass_std(x: np.ndarray, mask: np.ndarray) -> float:
    """Std of x minus its Gaussian blur (sigma 1 voxel) 2 voxels or more inside the mask (so the step at the
    mask border does not count): texture and noise level."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=2)
    inner = inner if inner.sum() >= 10 else mask
    idx = np.argwhere(mask)
    box = tuple(slice(max(a - 4, 0), b + 5) for a, b in zip(idx.min(0), idx.max(0)))
    crop = x[box].astype(np.float64)
    return float((crop - ndimage.gaussian_filter(crop, 1.0))[inner[box]].std())


def metrics(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray, peak: float) -> dict:
    err = fill[mask].astype(np.float64) - truth[mask].astype(np.float64)
    mse = float((err**2).mean())
    return {
        "mae": float(np.abs(err).mean()),
        "psnr": float(10 * np.log10(peak**2 / max(mse, 1e-12))),
        # 1 = as much fine texture/noise as the lesion-free truth; 0 = perfectly smooth
        "texture": high_pass_std(fill, mask) / max(high_pass_std(truth, mask), 1e-12),
    }


def data_range(truth: np.ndarray) -> float:
    from napari_meddiff.io.intensity import intensity_window

    lo, hi = intensity_window(truth)
    return hi - lo


# --- quality ---------------------------------------------------------------------------------------


def parse_setting(text: str) -> dict:
    """``jump_length=5,jump_n=2`` -> kwargs (ints), ``default`` -> {}."""
    if text in ("", "default"):
        return {}
    out = {}
    for part in text.split(","):
        key, value = part.split("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def quality(args, models: dict[str, str], settings: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    from scipy import ndimage

    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, make_subject

    loaded = {key: load_model(ref) for key, ref in models.items()}
    per_subject: list[dict] = []
    seeds = list(HELDOUT_SEEDS)[args.first_subject : args.first_subject + args.subjects]
    for s in seeds:
        subject = make_subject(s, resolution_mm=2.0, lesion=True)
        image = subject.image.array
        truth = subject.lesion_free.array
        mask = ndimage.binary_dilation(subject.lesion_mask.array > 0, iterations=args.dilate) & (image > 0)
        peak = data_range(truth)
        rows: dict[str, dict] = {}

        # `record` is called only within this iteration (never kept for a later one): the loop variables it reads
        # (image, truth, mask, peak, rows) are this subject's
        def record(name: str, fill: np.ndarray, seconds: float) -> None:
            assert np.array_equal(fill[~mask], image[~mask]), f"{name} changed voxels outside the mask"  # noqa: B023
            rows[name] = {**metrics(fill, truth, mask, peak), "seconds": seconds}  # noqa: B023

        record("lesion (no fill)", image, 0.0)
        t0 = time.perf_counter()
        record("shell mean", shell_mean_fill(image, mask), time.perf_counter() - t0)
        t0 = time.perf_counter()
        record("gaussian fill", gaussian_fill(image, mask, subject.image.affine), time.perf_counter() - t0)
        for key, model in loaded.items():
            for setting in settings[key]:
                kwargs = parse_setting(setting)
                label = f"{model.name} {setting}"
                fills, seconds = [], []
                for c in range(args.candidates):
                    t0 = time.perf_counter()
                    (vol,) = inpaint(
                        model,
                        subject.image,
                        mask.astype(np.uint8),
                        seed=c,
                        **{"steps": args.steps, "sampler": args.sampler, **kwargs},
                    )
                    seconds.append(time.perf_counter() - t0)
                    fills.append(vol.array)
                    record(f"{label} #{c}", vol.array, seconds[-1])
                cands = [rows.pop(f"{label} #{c}") for c in range(args.candidates)]
                rows[label] = {k: float(np.mean([r[k] for r in cands])) for k in ("mae", "psnr", "texture", "seconds")}
                if args.candidates > 1:
                    mean_fill = np.mean(fills, axis=0).astype(image.dtype)
                    record(f"{label} (mean of {args.candidates})", mean_fill, float(np.sum(seconds)))
        per_subject.append(
            {
                "seed": s,
                "mask_voxels": int(mask.sum()),
                "lesion_ml": subject.lesion_volume_ml,
                "lesion_factor": subject.image.metadata.get("lesion_intensity_factor"),
                "methods": rows,
            }
        )
        maes = ", ".join(f"{k} {v['mae']:.2f}" for k, v in rows.items())
        print(f"subject {s}: {int(mask.sum())} voxels, MAE: {maes}", flush=True)
    summary = []
    for name in per_subject[0]["methods"] if per_subject else []:
        vals = {k: [p["methods"][name][k] for p in per_subject] for k in ("mae", "psnr", "texture", "seconds")}
        summary.append(
            {
                "method": name,
                "mae": float(np.mean(vals["mae"])),
                "mae_sd": float(np.std(vals["mae"])),
                "psnr": float(np.mean(vals["psnr"])),
                "psnr_sd": float(np.std(vals["psnr"])),
                "texture": float(np.mean(vals["texture"])),
                "seconds": float(np.mean(vals["seconds"])),
            }
        )
    return per_subject, summary


# --- cost at 256^3 ---------------------------------------------------------------------------------


def large_case(size: int = 256, cube: int = 20):
    """A 2 mm subject resampled onto a ``size``^3 1 mm grid, and a ``cube``^3 mask in white matter."""
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, make_subject
    from napari_meddiff.io.geometry import make_grid, world_centre
    from napari_meddiff.io.volume import resample_like

    subject = make_subject(HELDOUT_SEEDS[0], resolution_mm=2.0, lesion=False)
    grid = make_grid((1.0, 1.0, 1.0), (size,) * 3, world_centre(subject.image))
    image = resample_like(subject.image, grid.empty_volume())
    labels = resample_like(subject.labels, grid.empty_volume(), labels=True).array
    wm = np.argwhere(labels == 3)
    centre = wm[np.argmin(np.abs(wm - wm.mean(0)).sum(1))]  # a white-matter voxel near the centre of mass
    mask = np.zeros(image.shape, np.uint8)
    lo = centre - cube // 2
    mask[lo[0] : lo[0] + cube, lo[1] : lo[1] + cube, lo[2] : lo[2] + cube] = 1
    return image, mask


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The highest current RSS seen by a background thread (every 5 ms) while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()

        def loop():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_mb())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def large_child(model_ref: str, steps: int | None, sampler: str | None, case: str) -> None:
    """In a fresh process: load the case and model, inpaint once, print JSON (time, RSS)."""
    data = np.load(case)
    image = Volume(data["image"], data["affine"])
    mask = data["mask"]
    model = load_model(model_ref)
    before = rss_mb()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        (out,) = inpaint(model, image, mask, steps=steps, sampler=sampler)
    seconds = time.perf_counter() - t0
    assert np.array_equal(out.array[mask == 0], image.array[mask == 0])
    prov = out.metadata["provenance"]
    print(
        json.dumps(
            {
                "model": model.name,
                "seconds": seconds,
                "rss_before_mb": before,
                "rss_peak_during_mb": rss.peak,
                "rss_added_mb": rss.peak - before,
                "image_mb": image.array.nbytes / 2**20,
                "shape": list(image.shape),
                "mask_voxels": int(mask.sum()),
                "sampler": prov["sampler"],
                "steps": prov["steps"],
                "network_evaluations_per_chain": prov["network_evaluations_per_chain"],
                "slices": prov["slices"],
            }
        )
    )


def cost(models: dict[str, str], steps: int | None, sampler: str | None, size: int) -> list[dict]:
    image, mask = large_case(size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.npz"
        np.savez(case, image=image.array, affine=image.affine, mask=mask)
        for ref in models.values():
            cmd = [sys.executable, __file__, "--large-child", ref, "--case", str(case)]
            cmd += ["--steps", str(steps)] if steps else []
            cmd += ["--sampler", sampler] if sampler else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                raise SystemExit(f"large case failed for {ref}:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{size}^3: {rows[-1]}", flush=True)
    return rows


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddpm", default="brain-ddpm-2d", help="pixel model ('' to skip)")
    parser.add_argument("--ldm", default="brain-ldm-3d", help="latent model ('' to skip)")
    parser.add_argument(
        "--ddpm-settings",
        nargs="+",
        default=["default", "jump_n=1"],
        help="settings to compare for the pixel model (comma-separated key=value, or 'default')",
    )
    parser.add_argument(
        "--ldm-settings",
        nargs="+",
        default=["default", "feather_voxels=2", "jump_length=5,jump_n=2"],
        help="settings to compare for the latent model",
    )
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--first-subject", type=int, default=0, help="offset into the held-out seeds")
    parser.add_argument("--candidates", type=int, default=2, help="candidates per subject (seeds 0..K-1)")
    parser.add_argument("--dilate", type=int, default=1, help="mask = lesion dilated by this many voxels")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    parser.add_argument("--large-size", type=int, default=256, help="edge of the cost case (0: skip)")
    parser.add_argument("--tiny", action="store_true", help="run on tiny random models (checks the script)")
    parser.add_argument("--name", default=None, help="results/<name>.json (default inpaint, inpaint_tiny with --tiny)")
    parser.add_argument("--large-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large_child:
        large_child(args.large_child, args.steps, args.sampler, args.case)
        return

    tmp = None
    if args.tiny:
        from napari_meddiff.testing.tiny_models import make_tiny_model

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        # fields of view large enough for a brain at 4 mm (random weights: the fills are noise)
        args.ddpm = str(make_tiny_model(root / "tiny-ddpm-2d", "ddpm", 2, image_shape=(48, 56)))
        args.ldm = str(make_tiny_model(root / "tiny-ldm-3d", "ldm", 3, image_shape=(48, 56, 48)))
        args.subjects, args.steps = min(args.subjects, 1), args.steps or 2
        args.ddpm_settings, args.ldm_settings = ["jump_n=1", "jump_length=1,jump_n=2"], ["feather_voxels=2"]
        args.large_size = min(args.large_size, 128)
    models = {k: v for k, v in (("ddpm", args.ddpm), ("ldm", args.ldm)) if v}
    settings = {"ddpm": args.ddpm_settings, "ldm": args.ldm_settings}
    started = time.perf_counter()
    per_subject, summary = quality(args, models, settings) if args.subjects > 0 else ([], [])
    print()
    print(table(summary, ["method", "mae", "mae_sd", "psnr", "psnr_sd", "texture", "seconds"]))
    large = cost(models, args.steps, args.sampler, args.large_size) if args.large_size else []
    if large:
        print()
        columns = [
            "model",
            "seconds",
            "image_mb",
            "rss_before_mb",
            "rss_peak_during_mb",
            "rss_added_mb",
            "steps",
            "network_evaluations_per_chain",
            "slices",
        ]
        print(table(large, columns))
    payload = {
        "benchmark": "inpaint",
        "tiny": bool(args.tiny),
        "models": {k: str(v) for k, v in models.items()},
        "settings": settings,
        "subjects": args.subjects,
        "candidates": args.candidates,
        "mask": f"lesion mask dilated by {args.dilate} voxel(s), 2 mm cohort",
        "steps": args.steps,
        "sampler": args.sampler,
        "summary": summary,
        "per_subject": per_subject,
        "large": large,
        "large_case": f"{args.large_size}^3 at 1 mm, 20^3 mask" if args.large_size else None,
        "machine": machine(),
        "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": time.perf_counter() - started,
    }
    path = save(args.name or ("inpaint_tiny" if args.tiny else "inpaint"), payload)
    print(f"\nwrote {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
