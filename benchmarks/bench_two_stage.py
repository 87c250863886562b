"""How good is the two-stage default (issue 39, items 2 and 4b): drawn tissue maps, and scans made on them.

For ``--num`` seeds, the map generator draws a map under requested conditions (brain volume swept evenly over
its range, CSF and lesion volume drawn at random), and the label-map model makes a scan on each map:

- **conditions obeyed**: each condition's requested volume (ml) against the volume measured in the drawn map
  (brain: GM + WM; CSF; lesion), Pearson per condition (target >= 0.8);
- **maps against real maps**: the project's two-sample test on the maps (value / 4) against held-out subjects'
  maps, and the mean tissue volumes of both;
- **scans against real scans**: the project's two-sample test (`napari_meddiff.audit.fidelity.two_sample_test`:
  0.5 indistinguishable, 1.0 always told apart) of the two-stage scans against held-out subjects' real scans
  (target <= 0.75);
- **seconds per volume** at the default settings, both stages (`generate` of the label-map model, no map);
- a figure: real subjects and two-stage samples at the same scale in three planes, the map's outline on each.

    python benchmarks/bench_two_stage.py --num 12 --json benchmarks/results/two_stage.json \
        --figure models/brain-tissue-maps-3d/samples.png [--generator runs/maps/model]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_from_labels import PLANES, held_out_items, save_grid_figure, show_plane  # noqa: E402
from common import machine, pearson  # noqa: E402

MEASURED = {"brain_volume": (2, 3), "csf_volume": (1,), "lesion_load": (4,)}  # labels each condition counts


def requested_conditions(generator, num: int, seed: int = 0) -> list[dict[str, float]]:
    """Brain volume swept evenly over [0.05, 0.95]; the other conditions uniform at random (seeded)."""
    rng = np.random.default_rng(seed)
    sweep = np.linspace(0.05, 0.95, num)
    out = []
    for i in range(num):
        values = {}
        for spec in generator.conditions:
            u = sweep[i] if spec.name == "brain_volume" else rng.uniform(0.05, 0.95)
            values[spec.name] = round(float(spec.low + u * (spec.high - spec.low)), 4)
        out.append(values)
    return out


def measured_ml(tissue_map: np.ndarray, voxel_ml: float) -> dict[str, float]:
    return {name: float(np.isin(tissue_map, labels).sum() * voxel_ml) for name, labels in MEASURED.items()}


def draw_maps(generator, seeds: list[int], conditions: list[dict[str, float]]) -> tuple[list[np.ndarray], float]:
    from napari_meddiff.tasks.generate import generate

    t0 = time.perf_counter()
    maps = [generate(generator, [s], conditions=c, device="cpu")[0].array for s, c in zip(seeds, conditions)]
    return maps, (time.perf_counter() - t0) / len(seeds)


def scans_on(model, maps: list[np.ndarray], seeds: list[int]) -> tuple[torch.Tensor, float]:
    """The label-map model's scan on each map (the model's grid), at its defaults; seconds per scan."""
    from napari_meddiff.diffusion.seeds import seeded_generators
    from napari_meddiff.tasks.from_labels import sample_from_label_arrays
    from napari_meddiff.tasks.settings import resolve_settings

    settings = resolve_settings(model, "generate", torch.device("cpu"))
    out, t0 = [], time.perf_counter()
    for m, seed in zip(maps, seeds):
        arr = torch.from_numpy(m.astype(np.int64))[None]
        out.append(sample_from_label_arrays(model, arr, seeded_generators([seed]), settings, torch.device("cpu")))
    return torch.cat(out)[:, None], (time.perf_counter() - t0) / len(seeds)


def condition_report(generator, conditions: list[dict], maps: list[np.ndarray]) -> dict:
    voxel_ml = float(np.prod(generator.voxel_size)) / 1000.0
    measured = [measured_ml(m, voxel_ml) for m in maps]
    report = {}
    for spec in generator.conditions:
        asked = [spec.in_units(c[spec.name]) for c in conditions]
        got = [m[spec.name] for m in measured]
        report[spec.name] = {
            "pearson": round(pearson(asked, got), 3),
            "requested_ml": [round(a, 1) for a in asked],
            "measured_ml": [round(g, 1) for g in got],
        }
    return report


def save_figure(path: Path, real: torch.Tensor, real_maps: torch.Tensor, fake: torch.Tensor, maps, title: str):
    """Real subjects (top rows) and two-stage samples (bottom rows), axial/coronal/sagittal, maps outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"real {i + 1}", real[i, 0].numpy(), real_maps[i].numpy()) for i in range(2)]
    rows += [(f"two-stage {i + 1}", fake[i, 0].numpy(), maps[i]) for i in range(3)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), squeeze=False)
    for r, (what, vol, lab) in enumerate(rows):
        for k, (name, cut) in enumerate(PLANES):
            show_plane(axes[r][k], vol, lab, cut, vol.shape[cut] // 2, f"{what}: {name}")
    save_grid_figure(fig, path, title)


def main(argv=None) -> int:
    from napari_meddiff.audit.fidelity import two_sample_test
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, write_cohort
    from napari_meddiff.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="brain-t1w-from-labels-3d", help="the label-map model (stage 2)")
    p.add_argument("--generator", default=None, help="the map generator (default: the model's own)")
    p.add_argument("--heldout", type=Path, default=ROOT / "data" / "cohort-2mm-heldout")
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    args = p.parse_args(argv)
    write_cohort(args.heldout, args.num, seed=HELDOUT_SEEDS.start, progress=False)  # kept when already there
    model = load_model(args.model, device="cpu")
    generator = load_model(args.generator or model.map_generator, device="cpu")
    real, real_maps, files = held_out_items(model, args.heldout, args.num)
    seeds = list(range(args.num))
    conditions = requested_conditions(generator, args.num)
    maps, map_seconds = draw_maps(generator, seeds, conditions)
    fake, scan_seconds = scans_on(model, maps, seeds)
    res = {"model": args.model, "generator": str(args.generator or model.map_generator), "machine": machine()}
    res["seconds_per_volume"] = {"map": round(map_seconds, 2), "scan": round(scan_seconds, 2),
                                 "both": round(map_seconds + scan_seconds, 2)}  # fmt: skip
    res["conditions"] = condition_report(generator, conditions, maps)
    voxel_ml = float(np.prod(generator.voxel_size)) / 1000.0
    for name, group in (("generated", maps), ("real", [m.numpy() for m in real_maps])):
        volumes = [measured_ml(m, voxel_ml) for m in group]
        res[f"mean_ml_{name}"] = {k: round(float(np.mean([v[k] for v in volumes])), 1) for k in MEASURED}
    fake_maps = torch.from_numpy(np.stack(maps).astype(np.float32))[:, None] / 4
    res["two_sample_maps"] = two_sample_test(real_maps.float()[:, None] / 4, fake_maps)
    res["two_sample_scans"] = two_sample_test(real, fake)
    print(json.dumps({k: v for k, v in res.items()}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.figure:
        acc = res["two_sample_scans"]["accuracy"]
        title = f"{model.name} on maps drawn by {generator.name}; two-sample accuracy {acc} (real top)"
        save_figure(args.figure, real, real_maps, fake, maps, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
