"""Generation speed: MONAI's own sampling path (1000-step DDPM, fp32) against ours, on the same weights.

    python benchmarks/bench_speed.py [--model brain-ldm-3d] [--quick]

Prints a table and writes benchmarks/results/speed_<model>.json. The baseline is MONAI's
`LatentDiffusionInferer.sample` (or `DiffusionInferer.sample` for pixel models) with `DDPMScheduler` at 1000 steps
in fp32, as the MONAI tutorials do; with --quick it runs the first 50 of those 1000 steps plus the decoding and
extrapolates linearly (reported as such). It also reports FLOPs per network evaluation and the achieved
fraction of this machine's measured matrix-multiply peak, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, machine, matmul_peak, peak_rss_mb, save, table, timed  # noqa: E402

from napari_meddiff import generate, load_model  # noqa: E402
from napari_meddiff.devices import resolve_device  # noqa: E402
from napari_meddiff.samplers import noise_scheduler  # noqa: E402
from napari_meddiff.sampling import autocast_context  # noqa: E402


def monai_baseline(model, steps_run: int, seed: int = 0) -> dict:
    """MONAI inferer.sample with DDPMScheduler(1000), fp32; ``steps_run`` < 1000 is extrapolated."""
    from monai.inferers import DiffusionInferer, LatentDiffusionInferer

    sched = noise_scheduler(model.config["scheduler"])
    sched.set_timesteps(sched.num_train_timesteps)
    total = len(sched.timesteps)
    all_timesteps = sched.timesteps
    noise = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(seed)).to(model.device)
    sched.timesteps = all_timesteps[:2]  # warm-up, as for ours
    with torch.inference_mode():
        DiffusionInferer(sched).sample(noise, model.unet, sched, verbose=False)
    sched.timesteps = all_timesteps[:steps_run]
    t0 = time.perf_counter()
    with torch.inference_mode():
        if model.kind == "ldm":
            inferer = LatentDiffusionInferer(sched, scale_factor=model.scale_factor)
            z = DiffusionInferer.sample(inferer, noise, model.unet, sched, verbose=False)
            chain = time.perf_counter() - t0
            t1 = time.perf_counter()
            model.autoencoder.decode_stage_2_outputs(z / model.scale_factor)
            decode = time.perf_counter() - t1
        else:
            DiffusionInferer(sched).sample(noise, model.unet, sched, verbose=False)
            chain, decode = time.perf_counter() - t0, 0.0
    per_step = chain / steps_run
    return {
        "seconds": per_step * total + decode,
        "steps_run": steps_run,
        "extrapolated": steps_run < total,
        "seconds_per_step": per_step,
        "decode_seconds": decode,
    }


def network_efficiency(model, peaks: dict) -> list[dict]:
    rows = []
    x = torch.randn((1, *model.sample_shape), device=model.device)
    t = torch.full((1,), 500, device=model.device, dtype=torch.long)
    nets = [("unet step", lambda: model.unet(x, timesteps=t))]
    if model.kind == "ldm":
        z = torch.randn((1, *model.sample_shape), device=model.device)
        nets.append(("autoencoder decode", lambda: model.autoencoder.decode_stage_2_outputs(z)))
    for name, fn in nets:
        with torch.inference_mode():
            flops = count_flops(fn)
            for precision in ("fp32", "bf16"):
                with autocast_context(model.device, precision):
                    seconds = timed(fn, repeat=5)
                rows.append({
                    "network": name, "precision": precision, "gflop": flops / 1e9, "ms": seconds * 1e3,
                    "gflop_per_s": flops / seconds / 1e9, "fraction_of_peak": flops / seconds / peaks[precision],
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-ldm-3d")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="extrapolate the baseline from 50 of its 1000 steps")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim", "dpm++"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    info = machine()
    print(f"# {model.name} ({model.kind}, {model.spatial_dims}D {'x'.join(map(str, model.image_shape))}) on {info['cpu']}, "
          f"{info['cores']} cores, torch {info['torch']}")
    peaks = {"fp32": matmul_peak(torch.float32, str(device)), "bf16": matmul_peak(torch.bfloat16, str(device))}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")

    eff = network_efficiency(model, peaks)
    print(table(eff, ["network", "precision", "gflop", "ms", "gflop_per_s", "fraction_of_peak"]))

    baseline = monai_baseline(model, 50 if args.quick else 1000)
    print(f"baseline MONAI inferer.sample, DDPM 1000 steps fp32: {baseline['seconds']:.1f} s/volume"
          + (f" (extrapolated from {baseline['steps_run']} steps)" if baseline["extrapolated"] else ""))

    defaults = {"sampler": model.config.get("defaults", {}).get("sampler", "dpm++"),
                "steps": model.config.get("defaults", {}).get("steps", 20),
                "precision": model.config.get("defaults", {}).get("precision", "fp32")}
    rows = []
    configs = [(s, k, p) for s in args.samplers for k in args.steps for p in ("fp32", "bf16")]
    default_cfg = (defaults["sampler"], defaults["steps"], defaults["precision"])
    if default_cfg not in configs:
        configs.append(default_cfg)
    for sampler, steps, precision in configs:
        generate(model, [0], sampler=sampler, steps=2, precision=precision)  # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        generate(model, [1], sampler=sampler, steps=steps, precision=precision)
        seconds = time.perf_counter() - t0
        rows.append({"sampler": sampler, "steps": steps, "precision": precision, "seconds": seconds,
                     "speedup_vs_baseline": baseline["seconds"] / seconds,
                     "default": (sampler, steps, precision) == default_cfg})
    print(table(rows, ["sampler", "steps", "precision", "seconds", "speedup_vs_baseline", "default"]))
    result = {"model": model.name, "machine": info, "matmul_peak_flops": peaks, "network_efficiency": eff,
              "baseline": baseline, "ours": rows, "defaults": defaults, "peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; written {save(f'speed_{model.name}', result)}")


if __name__ == "__main__":
    main()
