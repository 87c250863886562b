"""Evaluate the shipped models on held-out cohort subjects and write the "Measured" section of each card.

    python benchmarks/evaluate_models.py                      # all three shipped models
    python benchmarks/evaluate_models.py --models brain-ldm-3d --threads 2
    python benchmarks/evaluate_models.py --cards-only         # re-render the cards from the JSON
    python benchmarks/evaluate_models.py --models runs/x/model --heldout data/cohort-2mm-heldout   # a candidate

A model given as a folder outside ``models/`` is a candidate: its JSON (``evaluation.json``), samples PNG and
"Measured" card section go into that folder, never into the shipped models' files (unless ``--out`` says so).

Data: held-out subjects (``HELDOUT_SEEDS``) of the synthetic cohort, written once to ``--heldout`` (default
``data/cohort-heldout``) and preprocessed exactly like the model's training data (its ``train.yaml``).

Measured:
- LDM autoencoder: reconstruction PSNR and SSIM (MONAI metrics, data range 1) of held-out volumes.
- Generators: a classifier two-sample test (C2ST: a small CNN trained on half of the held-out real and
  generated images to tell them apart, accuracy on the other half, both ways round; ~0.5 = indistinguishable,
  1.0 = always told apart); brain-tissue intensity statistics: CSF/GM/WM mean and SD of the real images from the
  cohort labels, and for real and generated alike from a 3-class k-means of the brain intensities (generated
  images have no labels), the 1-Wasserstein distance between the brain-intensity histograms, intensity
  quantiles and the brain fraction of the field of view.

Segmentation models are measured by `bench_segment.py` (whole held-out volumes through `segment`, ensembles,
uncertainty, the MONAI UNet baseline of `train_segmentation_baseline.py`), which writes their cards.

The JSON (``benchmarks/results/evaluation.json``) is the source of the cards' "Measured" sections; they are
rendered from it, never typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from napari_meddiff.audit.fidelity import (  # noqa: E402,F401  (the two-sample test lives in the package now)
    SmallCNN,
    axial_slices,
    c2st,
    c2st_slices,
    train_classifier,
    two_sample_test,
)
from napari_meddiff.training.export import write_measured_section  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine as common_machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ["brain-ldm-3d", "brain-ddpm-2d"]  # brain-tissue-segdiff-2d: bench_segment.py --card
TARGETS = {"ae_psnr_db": 32.0, "c2st_accuracy": 0.70}  # issue 16 (issue 8 had 30 dB and 0.75)
TISSUES = ["CSF", "GM", "WM"]


def machine() -> str:
    """The card's one-line machine description (``common.machine``: CPU model, torch threads, torch)."""
    m = common_machine()
    return f"{m['cpu']}, {m['torch_threads']} torch thread(s), torch {m['torch']}"


# --- data ---------------------------------------------------------------------------------------------------


def ensure_heldout(folder: Path, num: int) -> Path:
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, write_cohort

    write_cohort(folder, num, seed=HELDOUT_SEEDS.start, progress=False)
    return folder


def model_train_config(model_dir: Path) -> dict:
    import yaml

    from napari_meddiff.training.config import validate

    raw = yaml.safe_load((model_dir / "train.yaml").read_text())
    raw.setdefault("data", {})["dir"] = "."  # replaced by the caller; validation needs a value
    return validate(raw)


def load_split(cfg: dict, folder: Path, num: int, with_labels: bool = True):
    """(images (N,1,*S), labels (N,*S), subject index per item, seeds) of the first ``num`` subjects."""
    from napari_meddiff.data.mni152 import check_split
    from napari_meddiff.training.data import cohort_seeds, preprocess_subject

    files = sorted(folder.glob(cfg["data"]["images"]))[:num]
    seeds = cohort_seeds(folder, files)
    check_split(seeds, "heldout")  # evaluation only ever uses held-out subjects
    imgs, labs, subj = [], [], []
    for i, f in enumerate(files):
        lab = f.with_name(f.name.replace(*cfg["data"]["labels_replace"])) if with_labels else None
        im, lb = preprocess_subject(
            f, lab, cfg["spatial_dims"], cfg["image_shape"], cfg["voxel_size"], cfg["intensity"], cfg["data"]
        )
        imgs.append(im)
        labs.append(lb)
        subj += [i] * len(im)
    images = torch.from_numpy(np.concatenate(imgs)).float().unsqueeze(1)
    labels = torch.from_numpy(np.concatenate(labs)).long() if with_labels else None
    return images, labels, np.array(subj), seeds


# --- metrics ------------------------------------------------------------------------------------------------


def kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 50, starts: str = "quantiles") -> np.ndarray:
    """Sorted cluster centres of 1D values: k-means from quantile starts, or (``starts="range"``) from starts
    spread evenly over the 1-99 % range, which does not split a class that holds most of the values."""
    if starts == "range":
        lo, hi = np.quantile(values, [0.01, 0.99])
        c = lo + (hi - lo) * (np.arange(k) + 0.5) / k
    else:
        c = np.quantile(values, np.linspace(0.15, 0.85, k))
    for _ in range(iters):
        a = np.argmin(np.abs(values[:, None] - c[None]), axis=1)
        new = np.array([values[a == j].mean() if np.any(a == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def tissue_stats(images: np.ndarray, labels: np.ndarray | None, threshold: float = 0.1) -> dict:
    vals = images[images > threshold]
    out = {
        "brain_fraction": round(float((images > threshold).mean()), 4),
        "quantiles_5_25_50_75_95": [round(float(q), 4) for q in np.quantile(vals, [0.05, 0.25, 0.5, 0.75, 0.95])],
    }
    centres = kmeans_1d(vals.astype(np.float64))
    assign = np.argmin(np.abs(vals[:, None] - centres[None]), axis=1)
    out["kmeans"] = {
        t: {"mean": round(float(vals[assign == j].mean()), 4), "sd": round(float(vals[assign == j].std()), 4)}
        for j, t in enumerate(TISSUES)
    }
    if labels is not None:
        out["labels"] = {
            t: {
                "mean": round(float(images[labels == j + 1].mean()), 4),
                "sd": round(float(images[labels == j + 1].std()), 4),
            }
            for j, t in enumerate(TISSUES)
        }
    return out


def wasserstein(a: np.ndarray, b: np.ndarray, threshold: float = 0.1) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a[a > threshold].ravel()[::7], b[b > threshold].ravel()[::7]))


def diversity(x: torch.Tensor, k: int = 20) -> float:
    """Mean pairwise RMS difference between the first ``k`` images (0: all identical)."""
    x = x[:k].flatten(1)
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return float(d.sum() / (len(x) * (len(x) - 1)))


def save_samples(path: Path, gen: torch.Tensor, real: torch.Tensor, title: str) -> None:
    from napari_meddiff.training.reporting import save_grid

    k = min(6, len(gen), len(real))
    gi = torch.linspace(0, len(gen) - 1, k).long()
    ri = torch.linspace(0, len(real) - 1, k).long()
    save_grid(path, [[x[0].numpy() for x in gen[gi]], [x[0].numpy() for x in real[ri]]], title)


def heldout_conditions(model, files: list[Path], n: int) -> list[dict[str, float]] | None:
    """A conditional model's conditions for ``n`` samples: sample i takes those of held-out subject i (in turn;
    ``files``: their images), measured from its label files as training measures them, on the model's scale
    (clipped to its range), so the generated set has the real set's spread of brain, CSF and lesion volume."""
    from napari_meddiff.training.conditions import MEASURES, measure_subject

    specs = list(model.conditions or [])
    if not specs:
        return None
    unknown = [s.name for s in specs if s.name not in MEASURES or s.unit_low is None or s.unit_high is None]
    if unknown:
        raise SystemExit(f"{model.name}: conditions {unknown} have no measure in ml to take from held-out subjects")
    per_subject = []
    for f in files:
        ml = measure_subject(f, [s.name for s in specs])
        per_subject.append(
            {
                s.name: min(
                    s.high, max(s.low, s.low + (v - s.unit_low) / (s.unit_high - s.unit_low) * (s.high - s.low))
                )
                for s, v in zip(specs, ml)
            }
        )
    return [per_subject[i % len(per_subject)] for i in range(n)]


def evaluate(name: str, args) -> dict:
    from napari_meddiff.models import find_model_dir, load_model
    from napari_meddiff.tasks.generate import generate

    model_dir = find_model_dir(name)
    model = load_model(model_dir)
    if model.kind == "segmentation":
        raise SystemExit(f"{name} is a segmentation model: measure it with benchmarks/bench_segment.py --card")
    cfg = model_train_config(model_dir)
    t0 = time.time()
    num = args.num_heldout
    real, labels, subj, seeds = load_split(cfg, args.heldout, num)
    res: dict = {
        "model": name,
        "kind": model.kind,
        "weights_sha256": model.weights_sha256,
        "heldout_seeds": seeds,
        "heldout_items": int(len(real)),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if model.kind == "ldm":
        from monai.metrics import PSNRMetric, SSIMMetric

        ae = model.autoencoder
        recs, recs_mean = [], []
        with torch.no_grad():  # one encoder pass per pair: decoded from a posterior draw (as MONAI's
            for i in range(0, len(real), 2):  # encode_stage_2_inputs gives it) and from the posterior mean
                z_mu, z_sigma = ae.encode(real[i : i + 2])
                recs.append(ae.decode_stage_2_outputs(ae.sampling(z_mu, z_sigma)))
                recs_mean.append(ae.decode(z_mu))
        rec, rec_mean = torch.cat(recs).clamp(0, 1), torch.cat(recs_mean).clamp(0, 1)
        psnr = PSNRMetric(max_val=1.0)(rec, real).flatten()
        ssim = SSIMMetric(spatial_dims=3, data_range=1.0)(rec, real).flatten()
        res["autoencoder"] = {
            "psnr_db": {"mean": round(float(psnr.mean()), 3), "sd": round(float(psnr.std()), 3)},
            "ssim": {"mean": round(float(ssim.mean()), 4), "sd": round(float(ssim.std()), 4)},
            "n_volumes": int(len(real)),
        }
        print(f"{name}: AE PSNR {float(psnr.mean()):.2f} dB, SSIM {float(ssim.mean()):.4f}", flush=True)
        # the floor a perfect diffusion model on this autoencoder would reach: its reconstructions (from the
        # posterior mean, its sharpest) against the real volumes, by the same two-sample test
        res["autoencoder"]["c2st_reconstructions"] = two_sample_test(real, rec_mean, seed=args.seed)
        print(
            f"{name}: C2ST of mean reconstructions vs real "
            f"{res['autoencoder']['c2st_reconstructions']['accuracy']:.3f}",
            flush=True,
        )
    if model.kind in ("ddpm", "ldm"):
        n = args.num_generated or (len(real) if model.spatial_dims == 3 else min(len(real), 400))
        t1 = time.time()
        conditions = heldout_conditions(model, sorted(args.heldout.glob(cfg["data"]["images"]))[:num], n)
        vols = generate(
            model,
            list(range(args.seed, args.seed + n)),
            batch_size=args.batch_size,
            device="cpu",
            conditions=conditions,
        )
        gen_seconds = time.time() - t1
        arr = np.stack([np.squeeze(v.array, -1) if model.spatial_dims == 2 else v.array for v in vols])
        fake = torch.from_numpy(arr).float().unsqueeze(1)
        sampling = {k: vols[0].metadata["provenance"][k] for k in ("sampler", "steps")}
        res["generation"] = {"n": n, **sampling, "seconds_per_sample": round(gen_seconds / n, 3)}
        if conditions is not None:
            res["generation"]["conditions"] = (
                "each sample those of a held-out subject (in turn), measured from its "
                "label files and put on the model's scale"
            )
        res["c2st"] = two_sample_test(real, fake, seed=args.seed)
        ridx = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[:20]
        res["diversity"] = {
            "real": round(diversity(real[ridx]), 4),
            "generated": round(diversity(fake), 4),
            "what": "mean pairwise RMS difference of 20 images",
        }
        r_np, f_np = real.numpy(), fake.numpy()
        res["intensity"] = {
            "real": tissue_stats(r_np[:, 0], labels.numpy()),
            "generated": tissue_stats(f_np[:, 0], None),
            "wasserstein_brain_intensity": round(wasserstein(r_np, f_np), 4),
        }
        png = results_path(name, args.out).parent / f"samples_{model_dir.name}.png"
        save_samples(
            png,
            fake,
            real,
            f"{name}: top generated ({sampling['sampler']} {sampling['steps']} steps), bottom held-out real",
        )
        res["samples_png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
        print(
            f"{name}: C2ST accuracy {res['c2st']['accuracy']:.3f}; "
            f"W1 {res['intensity']['wasserstein_brain_intensity']}",
            flush=True,
        )
    res["eval_minutes"] = round((time.time() - t0) / 60, 2)
    return res


# --- cards --------------------------------------------------------------------------------------------------


def fmt_ms(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def render(res: dict) -> str:
    lines = [
        f"Measured by `benchmarks/evaluate_models.py` on {res['date']} ({res['machine']}); "
        f"{len(res['heldout_seeds'])} held-out cohort subjects (seeds {min(res['heldout_seeds'])}-"
        f"{max(res['heldout_seeds'])}, never used in training), {res['heldout_items']} "
        f"{'volumes' if res['kind'] == 'ldm' else 'slices'}; weights sha256 {res['weights_sha256'][:12]}…. "
        f"Source: `{res.get('json', 'benchmarks/results/evaluation.json')}`.",
        "",
    ]
    miss = []
    if "autoencoder" in res:
        a = res["autoencoder"]
        ok = a["psnr_db"]["mean"] >= TARGETS["ae_psnr_db"]
        miss += [] if ok else [f"autoencoder PSNR {a['psnr_db']['mean']:.1f} dB < {TARGETS['ae_psnr_db']:.0f} dB"]
        lines.append(
            f"- Autoencoder reconstruction of held-out volumes: PSNR {fmt_ms(a['psnr_db'], 2)} dB, "
            f"SSIM {fmt_ms(a['ssim'], 4)} (target PSNR ≥ {TARGETS['ae_psnr_db']:.0f} dB: {'met' if ok else 'NOT met'})."
        )
        if "c2st_reconstructions" in a:
            lines.append(
                f"- The same two-sample test on the autoencoder's reconstructions (from the posterior mean) "
                f"against the real volumes: {a['c2st_reconstructions']['accuracy']:.3f} (the best a diffusion "
                "model on this autoencoder could reach)."
            )
    if "c2st" in res:
        c = res["c2st"]
        ok = c["accuracy"] <= TARGETS["c2st_accuracy"] and not c.get("degenerate")
        if c.get("degenerate"):
            miss.append("two-sample test inconclusive (the classifier predicted one class)")
        elif not ok:
            miss.append(f"two-sample accuracy {c['accuracy']:.2f} > {TARGETS['c2st_accuracy']}")
        g = res["generation"]
        what = c.get("classifier", "small CNN")
        lines.append(
            f"- Classifier two-sample test ({what}, real held-out vs {g['n']} generated with {g['sampler']} "
            f"{g['steps']} steps; 2-fold held-out accuracy, 0.5 = indistinguishable): **{c['accuracy']:.3f}** "
            f"(folds {c['folds']}, training accuracy {c.get('train_accuracy')}, {c['n_per_class']} per class; "
            f"target ≤ {TARGETS['c2st_accuracy']}: "
            f"{'inconclusive' if c.get('degenerate') else 'met' if ok else 'NOT met'}). "
            f"Sampling {g['seconds_per_sample']} s per sample on this CPU."
        )
        it = res["intensity"]
        r, gstat = it["real"], it["generated"]
        lines.append(
            "- Tissue intensities (normalised [0, 1]; mean ± SD). Real, from the cohort labels: "
            + ", ".join(f"{t} {fmt_ms(r['labels'][t])}" for t in TISSUES)
            + "."
        )
        lines.append(
            "  3-class k-means of brain intensities (> 0.1), real vs generated: "
            + "; ".join(f"{t} {fmt_ms(r['kmeans'][t])} vs {fmt_ms(gstat['kmeans'][t])}" for t in TISSUES)
            + "."
        )
        lines.append(
            f"  Brain-intensity 1-Wasserstein distance real vs generated {it['wasserstein_brain_intensity']:.4f}; "
            f"quantiles 5/25/50/75/95 % real {r['quantiles_5_25_50_75_95']} vs generated "
            f"{gstat['quantiles_5_25_50_75_95']}; brain fraction of the field of view {r['brain_fraction']} vs "
            f"{gstat['brain_fraction']}."
        )
        if "diversity" in res:
            dv = res["diversity"]
            lines.append(f"- Diversity ({dv['what']}): real {dv['real']:.4f}, generated {dv['generated']:.4f}.")
        lines.append(f"- Samples: `{res['samples_png']}`.")
    lines.append("")
    lines.append("First targets not met: " + ("; ".join(miss) + "." if miss else "none."))
    return "\n".join(lines)


def is_candidate(model_dir: Path) -> bool:
    """A model folder outside the shipped ``models/`` (a training run's export, say)."""
    return not model_dir.resolve().is_relative_to((ROOT / "models").resolve())


def results_path(name: str, out: Path | None) -> Path:
    """Where a model's results go: ``--out`` if given, else the shipped JSON, or a candidate's own folder."""
    from napari_meddiff.models import find_model_dir

    if out is not None:
        return out
    model_dir = find_model_dir(name)
    return model_dir / "evaluation.json" if is_candidate(model_dir) else RESULTS / "evaluation.json"


def update_card(model_dir: Path, res: dict) -> None:
    write_measured_section(model_dir, render(res))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=SHIPPED)
    p.add_argument("--heldout", type=Path, default=ROOT / "data" / "cohort-heldout")
    p.add_argument("--num-heldout", type=int, default=40, help="held-out subjects for generators/autoencoder")
    p.add_argument(
        "--num-generated", type=int, default=None, help="generated samples (default: as many as real, <= 400)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: benchmarks/results/evaluation.json; a candidate's own folder)",
    )
    p.add_argument("--cards-only", action="store_true", help="only re-render the cards from the JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_meddiff.models import find_model_dir

    if not args.cards_only:
        ensure_heldout(args.heldout, args.num_heldout)
    for name in args.models:
        out = results_path(name, args.out)
        if not args.cards_only:
            res = evaluate(name, args)
            res["json"] = str(out.resolve().relative_to(ROOT)) if out.resolve().is_relative_to(ROOT) else str(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            # re-read before writing: other evaluations may have written their models meanwhile
            results = json.loads(out.read_text()) if out.is_file() else {}
            results[name] = res
            tmp = out.with_name(out.name + ".part")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(out)
        else:
            results = json.loads(out.read_text()) if out.is_file() else {}
        if name in results:
            update_card(find_model_dir(name), results[name])
            print(render(results[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
