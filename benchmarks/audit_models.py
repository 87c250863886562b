"""Audit shipped 3D generators against their own training subjects and write the result into their model cards.

    python benchmarks/audit_models.py [--models brain-ldm-3d] [--num 40] [--real 20] [--work DIR]

For each model: its training subjects (the seeds its ``model.json`` lists) are written again as 2 mm cohort
subjects, ``--real`` held-out subjects beside them, and ``--num`` samples (seeds 0..) are generated with the
model's defaults; `napari_meddiff.audit` compares them. The figures go to ``results/audit_<model>.json`` and to
an "Audit" section of the model card (between markers, replaced on each run); the report to ``--work``.
2D models are not audited (the audit compares 3D volumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, others_cpu_use, save  # noqa: E402

import napari_meddiff as md  # noqa: E402
from napari_meddiff.data.mni152 import HELDOUT_SEEDS, write_cohort  # noqa: E402

BEGIN, END = "<!-- audit:begin -->", "<!-- audit:end -->"


def training_seeds(model_dir: Path) -> list[int]:
    seeds = json.loads((model_dir / "model.json").read_text())["data"]["train_seeds"]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise SystemExit(f"{model_dir}: training seeds are not one range; this script writes ranges")
    return seeds


def prepare_data(name: str, work: Path, num: int, real: int) -> dict[str, Path]:
    """Training subjects, held-out subjects and the model's samples, in folders under ``work``."""
    model = md.load_model(name)
    seeds = training_seeds(ROOT / "models" / name)
    folders = {k: work / k for k in ("training", "real", "synthetic")}
    write_cohort(folders["training"], len(seeds), seed=seeds[0])
    write_cohort(folders["real"], real, seed=HELDOUT_SEEDS[0])
    folders["synthetic"].mkdir(parents=True, exist_ok=True)
    missing = [s for s in range(num) if not (folders["synthetic"] / f"{name}_seed{s}.nii.gz").exists()]
    for seed, volume in zip(missing, md.generate(model, seeds=missing) if missing else []):
        md.write_volume(volume, folders["synthetic"] / f"{name}_seed{seed}.nii.gz")
    return folders


def card_section(name: str, result, seconds: float, num: int, seeds: list[int]) -> str:
    s = result.summary
    thr, memo, d, t = s["thresholds"]["memorization"], s["memorization"], s["diversity"], s["two_sample"]
    sims = np.array([r["similarity"] for r in s["synthetic"]])
    m = machine()
    return "\n".join(
        [
            f"Audited by `benchmarks/audit_models.py` on {time.strftime('%Y-%m-%d')} ({m['cpu']}, "
            f"{m['torch_threads']} torch thread(s)): {num} samples (seeds 0-{num - 1}, the model's default sampler) "
            f"against its {len(seeds)} training subjects (seeds {seeds[0]}-{seeds[-1]}, written again at 2 mm) and "
            f"{s['inputs']['real']['volumes']} held-out subjects; {seconds:.0f} s. "
            f"Source: `benchmarks/results/audit_{name}.json`.",
            "",
            f"- Memorization: **{memo['flagged']} of {memo['volumes']}** samples flagged as copies of a training "
            f"subject (threshold {thr['similarity']:.4f}, set by the held-out subjects, whose closest came to "
            f"{thr['real_nn_max']:.4f}); the samples' similarity to their nearest training subject: median "
            f"{np.median(sims):.4f}, highest {sims.max():.4f}.",
            f"- Diversity (mean pairwise MS-SSIM, higher is less diverse): samples {d['synthetic_ms_ssim']:.3f}, "
            f"held-out subjects {d['real_ms_ssim']:.3f}.",
            f"- Fidelity: two-sample CNN accuracy {t['accuracy']:.3f} (95 % CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}; "
            f"0.5 = indistinguishable); MMD permutation p = {s['mmd']['p_value']:.3g}.",
        ]
    )


def write_card_section(card: Path, section: str) -> None:
    """Replace the card's Audit section (between the markers), or append one."""
    text = card.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Audit (memorization, diversity, fidelity)\n\n" + block + "\n"
    card.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["brain-ldm-3d"])
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--real", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "meddiff-audit-models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        work = args.work / name
        folders = prepare_data(name, work, args.num, args.real)
        busy = others_cpu_use()
        start = time.perf_counter()
        result = md.audit(folders["synthetic"], folders["training"], folders["real"], work / "report", overwrite=True)
        seconds = time.perf_counter() - start
        seeds = training_seeds(ROOT / "models" / name)
        section = card_section(name, result, seconds, args.num, seeds)
        print(section)
        save(f"audit_{name}", {"machine": machine(), "others_cpu_use": busy, "seconds": round(seconds, 2),
                               "summary": result.summary})  # fmt: skip
        write_card_section(ROOT / "models" / name / "MODEL_CARD.md", section)
        print(f"report: {work / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
