"""Speed: MONAI's own sampling path against ours on the same weights, for every task; how close to this
machine's limit the networks run; memory.

    python benchmarks/bench_speed.py [--device cpu|cuda] [--quick] [--threads N] [--tasks generate-3d ...]
                                     [--skip networks tasks memory] [--compile]

Prints tables and writes ``benchmarks/results/speed.json`` (``speed_cuda.json`` on CUDA; the folder can be
moved with ``$MEDDIFF_BENCH_RESULTS``). Precisions timed: fp32, plus bf16 on CPUs with native bf16 (emulated
bf16 is ~1000x slower), plus bf16 and fp16 on CUDA.

1. **peak**: the highest dense throughput measured here per precision: a square matrix multiply (2048 on CPU,
   8192 on CUDA, also TF32 there) and a 3x3x3 convolution; fractions below are of the higher one.
2. **networks**: FLOPs per evaluation (``torch.utils.flop_counter``, counted on PyTorch's own convolution)
   and achieved FLOP/s for the default 3D model's UNet step (batch 1, 2, 4 on CPU; 1, 4, 16 on CUDA) and
   autoencoder decoding, under each option: ours (CPU: oneDNN convolutions, `napari_meddiff.runtime.cpu_kernels`;
   CUDA: cuDNN), PyTorch's kernel choice, ``channels_last_3d`` (ours on CPUs with native bf16; timed apart
   elsewhere), 1 and N threads, and ``torch.compile`` with ``--compile``.
3. **tasks**: seconds per volume, baseline and ours, and their ratio, each measured in a fresh process (whose
   peak RSS, and peak GPU memory on CUDA, are reported). Baseline: MONAI's path as the MONAI tutorials run
   it: DDPMScheduler with 1000 steps, fp32, PyTorch's kernel choice. For generation that is
   literally ``LatentDiffusionInferer.sample`` / ``DiffusionInferer.sample``, one volume at a time; MONAI has
   no inpainting or ensemble-segmentation call, so for those the baseline is the same task through our code
   with MONAI's DDPM scheduler at 1000 steps (inpainting: known region replaced after every step, as in
   MONAI's inpainting tutorial). Ours: the model's default (sampler, steps, precision ``auto``), and for
   generation each sampler at 10/20/50 steps in each precision. With ``--quick``, and always for the
   segmentation ensemble (about an hour at 1000 steps), a baseline is extrapolated from runs of 20 and 50
   steps: ``t(1000) = t(20) + (t(50) - t(20)) * 980 / 30`` (marked ``extrapolated``).
4. **memory**: decoding a 1 mm whole-brain latent (4x49x58x47 -> 196x232x188) in one pass and in MONAI
   ``SlidingWindowInferer`` windows: seconds, peak RSS (peak GPU memory on CUDA), and the PSNR of the
   windowed decode against the whole one.

Run it with nothing else busy on the machine: all figures are wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    count_flops,
    in_fresh_process,
    machine,
    matmul_peak,
    peak_rss_mb,
    precisions_for,
    reset_peak_rss,
    save,
    table,
    timed,
)

TASKS = ("generate-3d", "generate-2d", "inpaint-3d", "inpaint-2d", "segment-5")
TASK_MODELS = {
    "generate-3d": "brain-ldm-3d",
    "generate-2d": "brain-ddpm-2d",
    "inpaint-3d": "brain-ldm-3d",
    "inpaint-2d": "brain-ddpm-2d",
    "segment-5": "brain-tissue-segdiff-2d",
}
FULL_STEPS = 1000
QUICK_STEPS = (20, 50)


# --- peak and networks -------------------------------------------------------------------------------


def conv_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a large 3x3x3 convolution (oneDNN / cuDNN), a dense kernel that can beat GEMM on some CPUs."""
    c, batch = (96, 4) if device.type == "cpu" else (256, 16)
    conv = torch.nn.Conv3d(c, c, 3, padding=1, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(batch, c, 12, 14, 12, dtype=dtype, device=device)
    with torch.inference_mode():
        seconds = timed(lambda: conv(x), repeat=7, warmup=3)
    return 2 * c * c * 27 * x[0, 0].numel() * batch / seconds


def measure_peaks(device: torch.device) -> dict:
    """Per precision: matmul and conv3d FLOP/s and the higher of the two (the 'peak' fractions refer to).

    On CUDA, fp32 convolutions run on TF32 tensor cores (cuDNN's default), so the fp32 peak there is the TF32
    matmul rate; the strict fp32 matmul rate is reported beside it."""
    from napari_meddiff.runtime.precision import PRECISION_DTYPES

    out = {}
    n = 2048 if device.type == "cpu" else 8192
    for name in precisions_for(device):
        dtype = PRECISION_DTYPES[name]
        mm, cv = matmul_peak(dtype, str(device), n=n), conv_peak(dtype, device)
        out[name] = {"matmul": mm, "conv3d": cv, "peak": max(mm, cv)}
        if device.type == "cuda" and name == "fp32":
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            out[name]["matmul_tf32"] = matmul_peak(dtype, str(device), n=n)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            out[name]["peak"] = max(out[name]["peak"], out[name]["matmul_tf32"])
    return out


def network_rows(model, peaks: dict, threads: list[int], compile_: bool) -> list[dict]:
    """The UNet step and decoding under each option; FLOP/s as a fraction of this machine's peak.

    FLOPs are counted on PyTorch's own convolution call (`torch.utils.flop_counter` does not see oneDNN's)."""
    from napari_meddiff.runtime.cpu_kernels import pytorch_kernels, uses_channels_last
    from napari_meddiff.runtime.precision import autocast_context

    device = model.device
    precisions = precisions_for(device)
    rows = []

    def record(network, batch, option, precision, n_threads, fn, flops):
        if device.type == "cpu":
            torch.set_num_threads(n_threads)
        with torch.inference_mode(), autocast_context(device, precision):
            seconds = timed(fn, repeat=5, warmup=2)
        peak = peaks[n_threads][precision]["peak"]
        rows.append(
            {
                "network": network,
                "batch": batch,
                "option": option,
                "precision": precision,
                "threads": n_threads if device.type == "cpu" else "-",
                "gflop": flops / 1e9,
                "ms": seconds * 1e3,
                "gflop_per_s": flops / seconds / 1e9,
                "fraction_of_peak": flops / seconds / peak,
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)

    def nets_for(batch, memory_format=torch.contiguous_format, compiled=False):
        x = torch.randn((batch, *model.sample_shape), device=device).contiguous(memory_format=memory_format)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs for small networks
        unet = torch.compile(model.unet, mode=mode) if compiled else model.unet
        out = [("unet step", model.unet, lambda: unet(x, timesteps=t))]
        if model.kind == "ldm" and batch <= 2:
            decode = model.autoencoder.decode_stage_2_outputs
            decode = torch.compile(decode, mode=mode) if compiled else decode
            out.append(("decode", model.autoencoder, lambda: decode(x)))
        return out

    batches = (1, 2, 4) if device.type == "cpu" else (1, 4, 16)
    main_option = "ours: oneDNN" if device.type == "cpu" else "ours: cuDNN"
    for batch in batches:
        for name, net, fn in nets_for(batch):
            with torch.inference_mode(), pytorch_kernels(net):
                flops = count_flops(fn)
            for n in threads:
                for precision in precisions:
                    record(name, batch, main_option, precision, n, fn, flops)
                    if device.type == "cpu" and precision == "fp32":  # autocast already takes PyTorch's kernels
                        with pytorch_kernels(net):
                            record(name, batch, "PyTorch kernels", precision, n, fn, flops)
            # the other memory layout (ours already on CPUs with native bf16: `cpu_kernels.prefer_channels_last`)
            if batch == 1 and not uses_channels_last(net):
                net.to(memory_format=torch.channels_last_3d)
                (_, _, fn_cl), *_ = [e for e in nets_for(1, torch.channels_last_3d) if e[0] == name]
                for precision in precisions:
                    record(name, batch, "channels_last_3d", precision, threads[-1], fn_cl, flops)
                net.to(memory_format=torch.contiguous_format)
                if compile_:  # inductor lowers the convolutions itself (it cannot trace the oneDNN route)
                    with pytorch_kernels(net):
                        (_, _, fn_c), *_ = [e for e in nets_for(1, compiled=True) if e[0] == name]
                        for precision in precisions:
                            t0 = time.perf_counter()
                            with torch.inference_mode(), autocast_context(device, precision):
                                fn_c()
                            print(
                                f"torch.compile {name} {precision}: first call {time.perf_counter() - t0:.0f} s",
                                flush=True,
                            )
                            record(name, batch, "torch.compile", precision, threads[-1], fn_c, flops)
    if device.type == "cpu":
        torch.set_num_threads(threads[-1])
    return rows


# --- tasks (each measurement in a fresh process) -------------------------------------------------------


def _case():
    """A held-out 2 mm cohort subject with a lesion, and the lesion mask dilated by one voxel."""
    from scipy import ndimage

    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, make_subject

    subject = make_subject(HELDOUT_SEEDS[0], resolution_mm=2.0, lesion=True)
    image = subject.image
    mask = ndimage.binary_dilation(subject.lesion_mask.array > 0, iterations=1) & (image.array > 0)
    return image, mask.astype(np.uint8)


def _run_task(task: str, model, settings: dict, seed: int) -> float:
    """Seconds for one volume of ``task`` with ``settings`` (sampler/steps/precision/...; empty: defaults)."""
    from napari_meddiff import generate, inpaint, segment

    t0 = time.perf_counter()
    if task.startswith("generate"):
        generate(model, [seed], **settings)
    elif task.startswith("inpaint"):
        image, mask = _case()
        t0 = time.perf_counter()
        inpaint(model, image, mask, seed=seed, **settings)
    else:
        image, _ = _case()
        t0 = time.perf_counter()
        segment(model, image, ensemble=5, seed=seed, **settings)
    return time.perf_counter() - t0


def _monai_generate(model, steps: int, seed: int, decode: bool = True) -> float:
    """MONAI's inferer.sample with DDPMScheduler(1000) over its first ``steps`` timesteps (+ decoding)."""
    from monai.inferers import DiffusionInferer, LatentDiffusionInferer

    from napari_meddiff.diffusion.samplers import noise_scheduler

    sched = noise_scheduler(model.config["scheduler"])
    sched.set_timesteps(sched.num_train_timesteps)
    sched.timesteps = sched.timesteps[:steps]
    noise = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(seed)).to(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if model.kind == "ldm" and decode:
            inferer = LatentDiffusionInferer(sched, scale_factor=model.scale_factor)
            inferer.sample(noise, model.autoencoder, model.unet, sched, verbose=False)
        else:
            DiffusionInferer(sched).sample(noise, model.unet, sched, verbose=False)
    _sync(model.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def monai_baseline(model, steps_run: int, seed: int = 0) -> dict:
    """In this process: MONAI's inferer.sample (DDPMScheduler 1000 steps, fp32, PyTorch's kernels), batch 1;
    ``steps_run`` < 1000 runs that many steps and extrapolates per step (the decoding is run once)."""
    from napari_meddiff.autoencoder.passes import decode_latents
    from napari_meddiff.runtime.cpu_kernels import pytorch_kernels

    with pytorch_kernels(model.unet, model.autoencoder):
        _monai_generate(model, 2, seed, decode=False)  # warm-up
        chain = _monai_generate(model, steps_run, seed + 1, decode=False)  # the decoding is timed once, below
        z = torch.randn((1, *model.sample_shape), device=model.device)
        t0 = time.perf_counter()
        decode_latents(model, z, "fp32", mode="whole")
        _sync(model.device)
        decode = time.perf_counter() - t0 if model.kind == "ldm" else 0.0
    per_step = chain / steps_run
    return {
        "seconds": per_step * FULL_STEPS + decode,
        "steps_run": steps_run,
        "extrapolated": steps_run < FULL_STEPS,
        "seconds_per_step": per_step,
        "decode_seconds": decode,
    }


def task_child(task: str, variant: str, threads: int, device: str, configs: list[dict] | None = None) -> dict:
    """In a fresh process: time ``task`` as ``variant`` (``baseline``, ``baseline-quick`` or ``ours``)."""
    torch.set_num_threads(threads)
    from napari_meddiff import load_model
    from napari_meddiff.runtime.cpu_kernels import pytorch_kernels

    model = load_model(TASK_MODELS[task], device=device)
    out: dict = {"task": task, "variant": variant, "model": model.name}
    if variant.startswith("baseline"):
        steps_list = QUICK_STEPS if variant == "baseline-quick" else (FULL_STEPS,)
        times = {}
        with pytorch_kernels(model.unet, model.autoencoder):
            for steps in steps_list:
                if task.startswith("generate"):
                    _monai_generate(model, 2, seed=0)  # warm-up
                    times[steps] = _monai_generate(model, steps, seed=1)
                else:
                    settings = {"sampler": "ddpm", "steps": steps, "precision": "fp32"}
                    if task.startswith("inpaint"):
                        settings.update(jump_n=1)
                    _run_task(task, model, {**settings, "steps": 2}, seed=0)
                    times[steps] = _run_task(task, model, settings, seed=1)
        if variant == "baseline-quick":
            a, b = QUICK_STEPS
            seconds = times[a] + (times[b] - times[a]) * (FULL_STEPS - a) / (b - a)
        else:
            seconds = times[FULL_STEPS]
        out.update(
            seconds=seconds, extrapolated=variant == "baseline-quick", measured={str(k): v for k, v in times.items()}
        )
    else:
        from napari_meddiff.runtime.precision import resolve_precision

        defaults = model.sampling_defaults
        out["default"] = {**defaults, "precision": resolve_precision(defaults["precision"], model.device)}
        rows = []
        for settings in configs or [{}]:
            _run_task(task, model, {**settings, "steps": 2}, seed=0)  # warm-up: allocator, kernels
            seconds = _run_task(task, model, settings, seed=1)
            rows.append({**settings, "seconds": seconds})
        out["rows"] = rows
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def task_rows(tasks: list[str], threads: int, quick: bool, device: torch.device) -> tuple[list[dict], list[dict]]:
    summary, detail = [], []
    for task in tasks:
        configs = [{}]
        if task.startswith("generate"):
            configs += [
                {"sampler": s, "steps": k, "precision": p}
                for s in ("ddpm", "ddim", "dpm++")
                for k in (10, 20, 50)
                for p in precisions_for(device)
            ]
        variant = "baseline-quick" if quick or task == "segment-5" else "baseline"
        print(f"{task}: baseline ({variant}) ...", flush=True)
        base = in_fresh_process(task_child, task, variant, threads, str(device))
        print(f"{task}: baseline {base['seconds']:.1f} s/volume; ours ...", flush=True)
        ours = in_fresh_process(task_child, task, "ours", threads, str(device), configs)
        default, resolved = ours["rows"][0], ours["default"]
        summary.append(
            {
                "task": task,
                "model": base["model"],
                "baseline_s": base["seconds"],
                "baseline": "extrapolated" if base["extrapolated"] else "measured",
                "ours": f"{resolved['sampler']} {resolved['steps']} {resolved['precision']}",
                "ours_s": default["seconds"],
                "ratio": base["seconds"] / default["seconds"],
                "baseline_rss_mb": base["peak_rss_mb"],
                "ours_rss_mb": ours["peak_rss_mb"],
                **(
                    {"baseline_gpu_mb": base["peak_gpu_mb"], "ours_gpu_mb": ours["peak_gpu_mb"]}
                    if "peak_gpu_mb" in base
                    else {}
                ),
            }
        )
        for r in ours["rows"][1:]:
            detail.append({"task": task, **r, "ratio": base["seconds"] / r["seconds"]})
        print(table(summary[-1:], list(summary[-1])), flush=True)
    return summary, detail


# --- memory: whole vs windowed decoding ------------------------------------------------------------------


def decode_child(window: int | None, threads: int, device: str) -> dict:
    torch.set_num_threads(threads)
    from napari_meddiff import load_model
    from napari_meddiff.autoencoder.passes import decode_latents, encode_images
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, make_subject
    from napari_meddiff.runtime.precision import resolve_precision

    model = load_model("brain-ldm-3d", device=device)
    precision = resolve_precision("auto", model.device)
    a = np.squeeze(make_subject(HELDOUT_SEEDS[0], resolution_mm=1.0).image.array).astype(np.float32)
    lo, hi = np.percentile(a[a > a.min()], [0.5, 99.5])
    a = np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
    a = a[tuple(slice(0, n // 4 * 4) for n in a.shape)]
    z = encode_images(model, torch.from_numpy(a)[None, None].to(model.device), precision=precision)
    reset_peak_rss()  # the decoding's own peak, not the encoding's before it
    rss_before = peak_rss_mb()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    img = decode_latents(model, z, precision=precision, mode="whole" if window is None else "tiled", tile=window)
    _sync(model.device)
    seconds = time.perf_counter() - t0
    out = {
        "window": window,
        "precision": precision,
        "latent_shape": list(z.shape[1:]),
        "image_shape": list(img.shape[2:]),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_mb": rss_before,
        "image": img[0, 0].cpu().numpy(),
    }
    if model.device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory_rows(threads: int, device: torch.device) -> list[dict]:
    rows, whole = [], None
    for window in (None, 32, 24):
        r = in_fresh_process(decode_child, window, threads, str(device))
        img = r.pop("image")
        if window is None:
            whole = img
            r["psnr_vs_whole_db"] = float("inf")
        else:
            r["psnr_vs_whole_db"] = float(10 * np.log10(1.0 / np.mean((img - whole) ** 2)))
        r["window"] = "whole" if window is None else f"{window}^3 latent"
        rows.append(r)
        print(
            table(rows[-1:], ["window", "precision", "seconds", "peak_rss_mb", "peak_gpu_mb", "psnr_vs_whole_db"]),
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="extrapolate every baseline from 20 and 50 steps")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--skip", nargs="*", default=[], choices=["networks", "tasks", "memory"])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first call)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the baseline runs on the same device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from napari_meddiff import load_model
    from napari_meddiff.runtime.devices import resolve_device

    device = resolve_device(args.device)
    info = machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores, {args.threads} torch threads, torch {info['torch']}, "
        f"device {device}{' (' + info['cuda'] + ')' if device.type == 'cuda' else ''}",
        flush=True,
    )
    name = "speed" if device.type == "cpu" else "speed_cuda"
    previous = RESULTS / f"{name}.json"
    # sections skipped in this run keep their figures from the last run (each section records its own run)
    partial = bool(args.skip) or set(args.tasks) != set(TASKS)
    result: dict = json.loads(previous.read_text()) if partial and previous.is_file() else {}
    result.update({"machine": info, "device": str(device), "threads": args.threads, "quick": args.quick})
    result.setdefault("runs", {})
    if "networks" not in args.skip:
        threads = sorted({1, args.threads}) if device.type == "cpu" else [args.threads]
        peaks = {}
        for n in threads:
            torch.set_num_threads(n)
            peaks[n] = measure_peaks(device)
            for p, peak in peaks[n].items():
                print(
                    f"peak {p}, {n} thread(s): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()),
                    flush=True,
                )
        torch.set_num_threads(args.threads)
        model = load_model("brain-ldm-3d", device=device)
        result["peaks"] = peaks
        result["networks"] = network_rows(model, peaks, threads, args.compile)
        print(
            table(
                result["networks"],
                [
                    "network",
                    "batch",
                    "option",
                    "precision",
                    "threads",
                    "gflop",
                    "ms",
                    "gflop_per_s",
                    "fraction_of_peak",
                ],
            ),
            flush=True,
        )
    if "tasks" not in args.skip:
        summary, detail = task_rows(args.tasks, args.threads, args.quick, device)
        when = time.strftime("%Y-%m-%d %H:%M")
        for row in summary:
            row["date"] = when
        # tasks not run this time keep their rows (and their dates) from the last run
        result["tasks"] = merge_task_rows(result.get("tasks", []), summary)
        result["task_settings"] = merge_task_rows(result.get("task_settings", []), detail)
        print(table(detail, ["task", "sampler", "steps", "precision", "seconds", "ratio"]))
        print(
            table(
                summary,
                [
                    "task",
                    "model",
                    "baseline_s",
                    "baseline",
                    "ours",
                    "ours_s",
                    "ratio",
                    "baseline_rss_mb",
                    "ours_rss_mb",
                    "baseline_gpu_mb",
                    "ours_gpu_mb",
                ],
            )
        )
    if "memory" not in args.skip:
        result["memory"] = memory_rows(args.threads, device)
    for section in {"networks", "tasks", "memory"} - set(args.skip):
        result["runs"][section] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": info}
    print(f"written {save(name, result)}")


def merge_task_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` rows replace the ``old`` rows of their tasks; rows in TASKS order."""
    ran = {r["task"] for r in new}
    rows = [r for r in old if r.get("task") not in ran] + new
    return sorted(rows, key=lambda r: TASKS.index(r["task"]) if r.get("task") in TASKS else len(TASKS))


if __name__ == "__main__":
    main()
