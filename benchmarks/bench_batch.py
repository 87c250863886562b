"""Cohort generation throughput: volumes per minute for batch sizes 1, 2, 4 and for 1 and 2 processes.

    python benchmarks/bench_batch.py [--model brain-ldm-3d] [--quick]

Everything goes through the real path (`napari_meddiff.tasks.batch.generate_subjects`, files written and hashed) at
the model's default sampler, steps and precision, on CPU unless --device says otherwise:

- batch sizes: one process, all cores (torch's default threads), ``--num`` volumes per batch size;
- processes: ``meddiff generate`` alone (OMP_NUM_THREADS = all threads) against ``torchrun --nproc_per_node 2``
  (half the threads each), as subprocesses; "end to end" includes Python start-up, imports, model loading and
  the rendezvous, "steady" is volumes over the busiest rank's sampling time (from the sidecars);
- the baseline: MONAI's `LatentDiffusionInferer.sample` with `DDPMScheduler` at 1000 steps, fp32, batch 1
  (`bench_speed.monai_baseline`); it runs ``--baseline-steps`` of the 1000 steps plus the decoding and
  extrapolates linearly per step (the output says so), unless ``--baseline-steps 1000``.

Prints a table with the machine (CPU model, cores, load) and writes benchmarks/results/batch.json. Without the
default model on the search path it falls back to a randomly initialised tiny LDM and says so: those numbers
measure the machinery, not the real model. On a machine shared with other jobs the numbers are noisy; the load
average and the cores other processes kept busy just before the run are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, others_cpu_use, table  # noqa: E402

from napari_meddiff.models import DEFAULT_MODEL, available_models, load_model  # noqa: E402
from napari_meddiff.runtime.devices import resolve_device  # noqa: E402
from napari_meddiff.runtime.precision import resolve_precision  # noqa: E402
from napari_meddiff.tasks import batch  # noqa: E402
from napari_meddiff.tasks.generate import generate  # noqa: E402
from napari_meddiff.tasks.settings import task_defaults  # noqa: E402


def pick_model(name: str, scratch: Path) -> tuple[str, str | None]:
    """The model to measure (name or folder) and a note when it had to fall back to a tiny one."""
    if Path(name).is_dir() or name in available_models():
        return name, None
    from napari_meddiff.testing.tiny_models import make_tiny_model

    path = make_tiny_model(scratch / "tiny-ldm-3d", "ldm", 3)
    note = (
        f"{name} not found on the model search path: measured on a randomly initialised tiny LDM "
        f"(16x16x16, {path.name}); these numbers measure the machinery, not the real model"
    )
    return str(path), note


def bench_batch_sizes(
    model, sizes: list[int], num: int, device, settings: dict, scratch: Path, repeat: int
) -> list[dict]:
    """Best (and median) of ``repeat`` timed runs per batch size: the best is the least disturbed by other jobs."""
    rows = []
    for bs in sizes:
        seeds = list(range(1000, 1000 + num))
        generate(
            model,
            seeds[:bs],
            sampler=settings["sampler"],
            steps=2,
            device=str(device),
            batch_size=bs,
            precision=settings["precision"],
        )  # warm-up: allocator and oneDNN primitives for this shape
        times = []
        for _ in range(repeat):
            out = scratch / f"bs{bs}"
            t0 = time.perf_counter()
            report = batch.generate_subjects(
                model,
                batch.seed_blocks(seeds, bs),
                out,
                sampler=settings["sampler"],
                steps=settings["steps"],
                precision=settings["precision"],
                device=device,
                log=lambda msg: None,
            )
            times.append(time.perf_counter() - t0)
            assert len(report.written) == num
            shutil.rmtree(out)
        seconds, median = min(times), sorted(times)[len(times) // 2]
        rows.append(
            {
                "batch_size": bs,
                "volumes": num,
                "repeats": repeat,
                "seconds": seconds,
                "median_seconds": median,
                "seconds_per_volume": seconds / num,
                "volumes_per_min": 60 * num / seconds,
            }
        )
    return rows


def bench_processes(
    model_arg: str, counts: list[int], num: int, bs: int, threads: int, device: str, scratch: Path
) -> list[dict]:
    rows = []
    for nproc in counts:
        out = scratch / f"proc{nproc}"
        per = max(1, threads // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(per)}
        gen = [
            "generate",
            "--model",
            model_arg,
            "--num",
            str(num),
            "--seed",
            "2000",
            "--batch-size",
            str(bs),
            "--device",
            device,
            "--out",
            str(out),
        ]
        if nproc == 1:
            cmd = [sys.executable, "-m", "napari_meddiff.cli", *gen]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                "-m",
                "napari_meddiff.cli",
                "--",
                *gen,
            ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        busy: dict[int, float] = {}
        for sidecar in out.glob("*.json"):
            meta = json.loads(sidecar.read_text())
            busy[meta["rank"]] = busy.get(meta["rank"], 0.0) + float(meta["seconds"])
        steady = max(busy.values())
        rows.append(
            {
                "processes": nproc,
                "threads_per_process": per,
                "batch_size": bs,
                "volumes": num,
                "wall_seconds": wall,
                "volumes_per_min_end_to_end": 60 * num / wall,
                "volumes_per_min_steady": 60 * num / steady,
                "startup_seconds": wall - steady,
            }
        )
        shutil.rmtree(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="4 volumes per setting, baseline from 10 steps")
    parser.add_argument("--num", type=int, default=None, help="volumes per setting (default 8, --quick 4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--process-batch-size", type=int, default=1, help="batch size of the process runs")
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=None,
        help="MONAI baseline steps run, of 1000 (default 50, --quick 10; 1000: no extrapolation)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per batch size, best kept (default 3, --quick 1)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads in all (CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch.json")
    args = parser.parse_args()
    num = args.num or (4 if args.quick else 8)
    repeat = args.repeat or (1 if args.quick else 3)
    baseline_steps = min(1000, args.baseline_steps or (10 if args.quick else 50))

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine()
    load = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        model_arg, note = pick_model(args.model, scratch)
        model = load_model(model_arg, device=device)
        defaults = task_defaults(model, "generate")
        settings = {
            "sampler": defaults["sampler"],
            "steps": int(defaults["steps"]),
            "precision": resolve_precision(defaults["precision"], device),
        }
        print(
            f"# {model.name} ({model.kind}, {'x'.join(map(str, model.image_shape))}), {settings['sampler']} "
            f"{settings['steps']} steps {settings['precision']}, on {info['cpu']}, {info['cores']} cores, "
            f"{args.threads} threads, load average {load[0]:.1f}, torch {info['torch']}, device {device}"
        )
        if note:
            print(f"# NOTE: {note}")
        others = others_cpu_use()
        busy = others is not None and others > 0.25
        if busy:
            print(
                f"# WARNING: other processes keep {others:.1f} of {info['cores']} cores busy: timings are noisy, "
                "multi-threaded ones most (OpenMP threads wait for busy cores)"
            )

        sizes = bench_batch_sizes(model, args.batch_sizes, num, device, settings, scratch, repeat)
        print(
            table(
                sizes,
                [
                    "batch_size",
                    "volumes",
                    "repeats",
                    "seconds",
                    "median_seconds",
                    "seconds_per_volume",
                    "volumes_per_min",
                ],
            )
        )

        procs = bench_processes(
            model_arg, args.processes, num, args.process_batch_size, args.threads, args.device, scratch
        )
        print(
            table(
                procs,
                [
                    "processes",
                    "threads_per_process",
                    "batch_size",
                    "volumes",
                    "wall_seconds",
                    "volumes_per_min_end_to_end",
                    "volumes_per_min_steady",
                    "startup_seconds",
                ],
            )
        )

        from bench_speed import monai_baseline

        torch.set_num_threads(args.threads)
        base = monai_baseline(model, baseline_steps)
        ours_bs1 = next((r["seconds_per_volume"] for r in sizes if r["batch_size"] == 1), None)
        best = min(sizes, key=lambda r: r["seconds_per_volume"])
        ratio = {
            "baseline_seconds_per_volume": base["seconds"],
            "ours_batch1_seconds_per_volume": ours_bs1,
            "speedup_batch1": base["seconds"] / ours_bs1 if ours_bs1 else None,
            "best_batch_size": best["batch_size"],
            "speedup_best_batch": base["seconds"] / best["seconds_per_volume"],
        }
        how = (
            f"extrapolated from {base['steps_run']} of 1000 steps ({base['seconds_per_step'] * 1e3:.1f} ms/step) "
            f"+ decode {base['decode_seconds']:.2f} s"
            if base["extrapolated"]
            else "all 1000 steps run"
        )
        print(
            f"MONAI baseline (LatentDiffusionInferer.sample, DDPMScheduler 1000 steps, fp32, batch 1): "
            f"{base['seconds']:.1f} s/volume, {how}"
        )
        print(
            f"ours ({settings['sampler']} {settings['steps']} steps, files written): "
            + (f"{ours_bs1:.2f} s/volume at batch 1 -> {ratio['speedup_batch1']:.1f}x faster; " if ours_bs1 else "")
            + f"{best['seconds_per_volume']:.2f} s/volume at batch {best['batch_size']} -> "
            f"{ratio['speedup_best_batch']:.1f}x faster than the baseline"
        )
        result = {
            "model": model.name,
            "model_note": note,
            "machine": {**info, "load_average": load, "others_cpu_use": others, "busy": busy},
            "device": str(device),
            "threads": args.threads,
            "settings": settings,
            "quick": args.quick,
            "batch_sizes": sizes,
            "processes": procs,
            "baseline": {**base, "how": how},
            "ratio": ratio,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
