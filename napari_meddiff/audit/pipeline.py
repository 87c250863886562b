"""`audit`: memorization, diversity and fidelity of a folder of synthetic volumes, in one summary.

Steps: read every volume onto the audit grid (`grid.py`), find each synthetic volume's nearest training
volume and the threshold real subjects set (`memorization.py`), the mean pairwise MS-SSIM of the synthetic
and the real (else training) volumes (`diversity.py`), and with real volumes the two-sample tests
(`fidelity.py`). `report.py` writes the summary as ``audit.json`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_meddiff.audit import memorization
from napari_meddiff.audit.grid import (
    BOX_MM,
    REFERENCE_VOLUMES,
    SEARCH_MM,
    SPACING_MM,
    Prepared,
    find_volumes,
    make_reference,
    prepare,
)
from napari_meddiff.errors import Cancelled, MeddiffError

Progress = Callable[[str, int, int], None]
FID_MISSING = (
    "not computed: FID needs pretrained MedicalNet (3D) or RadImageNet (2.5D) feature weights, which are not "
    "installed and cannot be downloaded here"
)


@dataclasses.dataclass
class AuditResult:
    """The summary (what ``audit.json`` holds) and the volumes on the audit grid, by set."""

    summary: dict
    volumes: dict[str, list[Prepared]]

    @property
    def flagged(self) -> list[dict]:
        """The synthetic volumes flagged as memorized, most similar first."""
        rows = [r for r in self.summary["synthetic"] if r["memorized"]]
        return sorted(rows, key=lambda r: -r["similarity"])


@dataclasses.dataclass
class _Run:
    on_progress: Progress | None
    should_cancel: Callable[[], bool] | None

    def progress(self, stage: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if self.should_cancel is not None and self.should_cancel():
                raise Cancelled()
            if self.on_progress is not None:
                self.on_progress(stage, done, total)

        return report


def audit(
    synthetic: str | os.PathLike,
    training: str | os.PathLike,
    real: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    spacing_mm: float = SPACING_MM,
    max_pairs: int = 200,
    permutations: int = 1000,
    classifier_steps: int = 600,
    seed: int = 0,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
) -> AuditResult:
    """Audit the synthetic volumes in folder ``synthetic`` against the ``training`` folder (and held-out
    ``real`` scans, which set the memorization threshold and allow the fidelity tests); with ``out``, write
    ``audit.json`` and ``report.html`` there (an existing report only with ``overwrite``). ``on_progress(stage,
    done, total)`` reports progress, ``should_cancel()`` stops the audit (`Cancelled`)."""
    from napari_meddiff.audit.report import check_outputs, write_report

    started = time.perf_counter()
    if spacing_mm <= 0 or not np.isfinite(spacing_mm):
        raise MeddiffError(f"the audit spacing must be a positive number of mm, got {spacing_mm}")
    if out is not None:
        check_outputs(Path(out), overwrite)
    run = _Run(on_progress, should_cancel)
    volumes = read_sets(synthetic, training, real, spacing_mm, run, on_skip)
    summary = {
        "inputs": _inputs(synthetic, training, real, volumes),
        "grid": {"spacing_mm": spacing_mm, "box_mm": list(BOX_MM), "search_mm": SEARCH_MM},
        **_memorization(volumes, run),
        "diversity": _diversity(volumes, max_pairs, seed, run),
        **_fidelity(volumes, permutations, classifier_steps, seed, run),
    }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    result = AuditResult(summary, volumes)
    if out is not None:
        write_report(result, Path(out), overwrite=overwrite)
    return result


def read_sets(synthetic, training, real, spacing_mm: float, run: _Run, on_skip=None) -> dict[str, list[Prepared]]:
    """Every set's volumes on the audit grid, aligned to a reference made of the first training volumes."""
    folders = {"training": training, "synthetic": synthetic, **({"real": real} if real is not None else {})}
    paths = {
        name: find_volumes(folder, one_per_subject=name != "synthetic", on_skip=on_skip)
        for name, folder in folders.items()
    }
    source = "real" if "real" in paths else "training"
    if len(paths[source]) < memorization.MIN_REFERENCE_SUBJECTS:
        raise MeddiffError(
            f"the memorization threshold needs at least {memorization.MIN_REFERENCE_SUBJECTS} {source} subjects "
            f"({'held-out scans' if source == 'real' else 'each against the others, as no real scans are given'}); "
            f"found {len(paths[source])} in {folders[source]}"
        )
    first = paths["training"][:REFERENCE_VOLUMES]
    report = run.progress("reference")
    centred = []
    for i, path in enumerate(first):
        centred.append(prepare(path, spacing_mm))
        report(i + 1, len(first))
    reference = make_reference(centred)
    volumes = {}
    for name, files in paths.items():
        report = run.progress(f"reading {name}")
        volumes[name] = []
        for i, path in enumerate(files):
            volumes[name].append(prepare(path, spacing_mm, reference))
            report(i + 1, len(files))
    return volumes


def _inputs(synthetic, training, real, volumes: dict[str, list[Prepared]]) -> dict:
    folders = {"synthetic": synthetic, "training": training, "real": real}
    return {
        name: {"folder": None if folder is None else str(folder), "volumes": len(volumes.get(name, []))}
        for name, folder in folders.items()
    }


def _memorization(volumes: dict[str, list[Prepared]], run: _Run) -> dict:
    """Nearest training volumes of the synthetic volumes, the threshold and the decisions."""
    training = volumes["training"]
    source = "real" if "real" in volumes else "leave-one-out"
    queries = volumes["real"] if "real" in volumes else training
    reference, pairwise = memorization.nearest(
        queries, training, leave_one_out=source == "leave-one-out", on_progress=run.progress(f"nearest: {source}")
    )
    threshold = memorization.threshold([n.similarity for n in reference], source, pairwise)
    found, _ = memorization.nearest(volumes["synthetic"], training, on_progress=run.progress("nearest: synthetic"))

    def row(item: Prepared, match: memorization.Nearest, flag: bool) -> dict:
        return {
            "file": str(item.path),
            "nearest_training": str(training[match.index].path),
            "similarity": round(match.similarity, 6),
            "mirrored": match.mirrored,
            **({"memorized": match.similarity > threshold["similarity"]} if flag else {}),
        }

    rows = [row(item, match, True) for item, match in zip(volumes["synthetic"], found)]
    return {
        "synthetic": rows,
        "memorization": {
            "flagged": sum(r["memorized"] for r in rows),
            "volumes": len(rows),
            "reference": [row(item, match, False) for item, match in zip(queries, reference)],
        },
        "thresholds": {"memorization": threshold},
    }


def _diversity(volumes: dict[str, list[Prepared]], max_pairs: int, seed: int, run: _Run) -> dict:
    """Mean pairwise MS-SSIM of the synthetic volumes and of the real (else the training) volumes."""
    from napari_meddiff.audit.diversity import mean_pairwise_ms_ssim

    other = "real" if "real" in volumes else "training"
    out = {}
    for name in ("synthetic", other):
        images = [p.image for p in volumes[name]]
        out[name] = mean_pairwise_ms_ssim(images, max_pairs, seed, on_progress=run.progress(f"MS-SSIM: {name}"))
    return {
        "synthetic_ms_ssim": out["synthetic"]["ms_ssim"],
        "real_ms_ssim": out["real"]["ms_ssim"] if other == "real" else None,
        "training_ms_ssim": out["training"]["ms_ssim"] if other == "training" else None,
        "details": out,
        "reading": "higher is less diverse (1: identical volumes)",
    }


def _fidelity(volumes: dict[str, list[Prepared]], permutations: int, steps: int, seed: int, run: _Run) -> dict:
    """The two-sample tests between real and synthetic volumes (with real volumes only)."""
    if "real" not in volumes:
        missing = {"computed": False, "reason": "needs held-out real scans (--real)"}
        return {"two_sample": missing, "mmd": missing, "fid": {"computed": False, "reason": FID_MISSING}}
    import torch

    from napari_meddiff.audit.fidelity import classifier_test, mmd_test

    real = np.stack([p.image for p in volumes["real"]])
    synthetic = np.stack([p.image for p in volumes["synthetic"]])
    report = run.progress("two-sample test")
    report(0, 2)
    two_sample = classifier_test(torch.from_numpy(real)[:, None], torch.from_numpy(synthetic)[:, None], seed, steps)
    report(1, 2)
    mmd = mmd_test(real, synthetic, permutations, seed)
    report(2, 2)
    return {"two_sample": two_sample, "mmd": mmd, "fid": {"computed": False, "reason": FID_MISSING}}
