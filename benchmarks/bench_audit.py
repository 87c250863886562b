"""Full-size check of the audit (issue 40): copies of training subjects hidden among new subjects are flagged
with their source named, new subjects are not, and how long the audit of such a folder takes.

    python benchmarks/bench_audit.py [--training 40] [--synthetic 40] [--real 20] [--threads 1] [--work DIR]

Cohort subjects at 2 mm (``meddiff cohort``): ``--training`` training subjects (seeds 0..), ``--real``
held-out subjects (seeds 100000..), and a synthetic folder of one copy of a training subject under each
transformation of `napari_meddiff.testing.copies` plus new training-split subjects (seeds 50000..) up to
``--synthetic`` volumes. The cohort is written once into ``--work`` (default: a folder in the system's temporary
folder, reused by later runs); the timing is the audit alone (`napari_meddiff.audit`, all stages: reading,
nearest neighbours, MS-SSIM, two-sample tests, report). Writes ``results/audit.json`` and the report into
``--work/report``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, others_cpu_use, save, table  # noqa: E402

import napari_meddiff as md  # noqa: E402
from napari_meddiff.audit import memorization  # noqa: E402
from napari_meddiff.data.mni152 import write_cohort  # noqa: E402
from napari_meddiff.io.volume import read_volume, write_volume  # noqa: E402
from napari_meddiff.testing.copies import TRANSFORMATIONS, transformed  # noqa: E402

NEW_SEED = 50_000


def write_data(work: Path, training: int, synthetic: int, real: int) -> tuple[dict, dict]:
    """The cohort folders and the synthetic folder's contents: copies (name -> (kind, source)) and new names."""
    folders = {name: work / name for name in ("training", "real", "new", "synthetic")}
    write_cohort(folders["training"], training, seed=0)
    write_cohort(folders["real"], real, seed=100_000)
    write_cohort(folders["new"], synthetic - len(TRANSFORMATIONS), seed=NEW_SEED)
    shutil.rmtree(folders["synthetic"], ignore_errors=True)
    folders["synthetic"].mkdir()
    sources = sorted(folders["training"].glob("sub-*_T1w.nii.gz"))
    rng = np.random.default_rng(0)
    copies = {}
    for i, kind in enumerate(TRANSFORMATIONS):
        name = f"copy-{kind}-of-{sources[i].name.split('_')[0]}.nii.gz"
        write_volume(transformed(read_volume(sources[i]), kind, rng), folders["synthetic"] / name)
        copies[name] = (kind, sources[i].name)
    new = []
    for path in sorted(folders["new"].glob("sub-*_T1w.nii.gz"))[: synthetic - len(TRANSFORMATIONS)]:
        shutil.copy(path, folders["synthetic"] / path.name)
        new.append(path.name)
    return folders, {"copies": copies, "new": new}


def run_audit(folders: dict, out: Path) -> tuple[object, float, dict]:
    """The audit with its wall time and the seconds of each stage."""
    stages: dict[str, list[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    start = time.perf_counter()
    result = md.audit(folders["synthetic"], folders["training"], folders["real"], out, overwrite=True,
                      on_progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    durations, previous = {}, start
    for name, (_, last) in sorted(stages.items(), key=lambda item: item[1][0]):  # from the previous stage's end
        durations[name], previous = round(last - previous, 2), last
    durations["report"] = round(start + seconds - previous, 2)
    return result, seconds, durations


def separation(result, contents: dict) -> dict:
    """Copies and new subjects against the thresholds (held-out real, and leave-one-out within training)."""
    rows = {Path(r["file"]).name: r for r in result.summary["synthetic"]}
    volumes = result.volumes
    found, pairwise = memorization.nearest(volumes["training"], volumes["training"], leave_one_out=True)
    loo = memorization.threshold([n.similarity for n in found], "leave-one-out", pairwise)
    copies = [
        {"transformation": kind, "source": source, "nearest": Path(rows[name]["nearest_training"]).name,
         "similarity": rows[name]["similarity"], "flagged": rows[name]["memorized"]}
        for name, (kind, source) in contents["copies"].items()
    ]  # fmt: skip
    new = [rows[name]["similarity"] for name in contents["new"]]
    return {
        "threshold_real": result.summary["thresholds"]["memorization"],
        "threshold_leave_one_out": loo,
        "copies": copies,
        "all_copies_flagged_with_source": all(c["flagged"] and c["nearest"] == c["source"] for c in copies),
        "new_subjects": len(new),
        "new_flagged": sum(rows[name]["memorized"] for name in contents["new"]),
        "new_similarity_max": max(new),
        "new_similarity_median": float(np.median(new)),
        "new_above_leave_one_out": sum(s > loo["similarity"] for s in new),
        "copies_below_leave_one_out": sum(c["similarity"] <= loo["similarity"] for c in copies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training", type=int, default=40)
    parser.add_argument("--synthetic", type=int, default=40)
    parser.add_argument("--real", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "meddiff-bench-audit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folders, contents = write_data(args.work, args.training, args.synthetic, args.real)
    busy = others_cpu_use()
    result, seconds, stages = run_audit(folders, args.work / "report")
    found = separation(result, contents)
    s = result.summary
    print(table(found["copies"], ["transformation", "source", "nearest", "similarity", "flagged"]))
    thr, loo = found["threshold_real"], found["threshold_leave_one_out"]
    print(f"threshold {thr['similarity']:.4f} (real nearest max {thr['real_nn_max']:.4f}); leave-one-out "
          f"{loo['similarity']:.4f}; new subjects: max {found['new_similarity_max']:.4f}, flagged "
          f"{found['new_flagged']} of {found['new_subjects']}")  # fmt: skip
    print(f"audit of {args.synthetic} synthetic vs {args.training} training (+{args.real} real): {seconds:.1f} s on "
          f"{args.threads} thread(s); stages: {stages}")  # fmt: skip
    payload = {
        "machine": machine(),
        "others_cpu_use": busy,
        "date": time.strftime("%Y-%m-%d"),
        "sizes": {"training": args.training, "synthetic": args.synthetic, "real": args.real, "cohort_mm": 2.0},
        "seconds": round(seconds, 2),
        "stages_seconds": stages,
        "separation": found,
        "diversity": {k: s["diversity"][k] for k in ("synthetic_ms_ssim", "real_ms_ssim")},
        "two_sample": {k: s["two_sample"].get(k) for k in ("accuracy", "ci95", "p_value")},
        "mmd_p_value": s["mmd"].get("p_value"),
    }
    print(f"wrote {save('audit', payload)} and {args.work / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
