"""The MONAI Zoo brain LDM (Pinaya et al. 2022) at full size, 1 mm, one volume: its own sampling path against ours.

A bundle folder with the full-size architecture of ``brain_image_synthesis_latent_diffusion_model`` (random
weights in MONAI Generative's key format, `napari_meddiff.testing.bundle_fixtures`) is sampled twice, each in a
fresh process so that each peak RSS (``VmHWM``) is its own:

* ``bundle``: what its ``configs/inference.json`` + ``scripts/sampler.py`` do, written out with MONAI's classes
  (the bundle's script itself is never imported): networks from the config, ``load_old_state_dict`` of
  ``torch.load``, its ``DDIMScheduler`` at 50 steps, noise ``(1, 3, 20, 28, 20)``, the 4 conditions concatenated
  and as cross-attention context, fp32, one whole-volume decode;
* ``ours``: the model loaded as ``meddiff generate`` loads it (weights held at the default precision) and
  ``generate`` at the model's default settings (in-process: where time goes);
* ``meddiff generate --model BUNDLE --num 1`` as a user runs it, fresh process, start to exit (imports, weight
  loading, writing the NIfTI), with ``--decode auto`` (the default) and ``--decode whole``.

Seconds of the first two rows are wall time from noise to the decoded volume (loading is reported apart). On the
CPU it also prints the arithmetic of the default settings (FLOPs of the UNet steps and the decoding) and the least
time this machine's measured convolution peak allows for it (``arithmetic_floor``). Usage:
``python benchmarks/bench_bundle.py [--threads 2] [--device cpu]`` (writes ``results/bundle.json``);
``--cli-repeats N`` runs only the default CLI row N times (its run-to-run spread, ``results/bundle_cli_repeats.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    CLI_WITH_PEAK,
    in_fresh_process,
    machine,
    others_cpu_use,
    peak_rss_mb,
    reset_peak_rss,
    save,
    table,
)

BUNDLE = "brain_image_synthesis_latent_diffusion_model"
CONDITIONS = {"gender": 1.0, "age": 0.5, "ventricular_volume": 0.2, "brain_volume": 0.4}


def latent_shape(folder: str) -> list[int]:
    """The spatial latent shape the bundle's noise expression draws (read from metadata, as meddiff does)."""
    from napari_meddiff.models import read_config

    return read_config(Path(folder))["latent"]["shape"]


def bundle_path_child(folder: str, threads: int, device: str) -> dict:
    """The bundle's own inference (its inference.json and scripts/sampler.py), with MONAI's classes."""
    import json

    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    torch.set_num_threads(threads)
    dev = torch.device(device)
    t0 = time.perf_counter()
    cfg = json.loads((Path(folder) / "configs" / "inference.json").read_text())

    def network_kwargs(d):  # not ours: no meddiff import
        return {k: v for k, v in d.items() if not k.startswith("_")}

    autoencoder = AutoencoderKL(**network_kwargs(cfg["autoencoder_def"]))
    autoencoder.load_old_state_dict(torch.load(Path(folder) / "models" / "autoencoder.pt", weights_only=True))
    diffusion = DiffusionModelUNet(**network_kwargs(cfg["diffusion_def"]))
    diffusion.load_old_state_dict(torch.load(Path(folder) / "models" / "model.pt", weights_only=True))
    autoencoder.to(dev).eval()
    diffusion.to(dev).eval()
    scheduler = DDIMScheduler(**network_kwargs(cfg["scheduler"]))
    scheduler.set_timesteps(num_inference_steps=50)
    load_s = time.perf_counter() - t0
    conditioning = torch.tensor([[list(CONDITIONS.values())]]).to(dev)  # (1, 1, 4), as "conditioning" builds it
    torch.manual_seed(0)
    noise = torch.randn((1, 3, *latent_shape(folder))).to(dev)  # (1, 3, 20, 28, 20) at full size
    t0 = time.perf_counter()
    with torch.no_grad():  # scripts/sampler.py, Sampler.sampling_fn
        image = noise
        cond_concat = conditioning.squeeze(1).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)
        cond_concat = cond_concat.expand(list(cond_concat.shape[0:2]) + list(noise.shape[2:]))
        for t in scheduler.timesteps:
            out = diffusion(
                torch.cat((image, cond_concat), dim=1),
                timesteps=torch.Tensor((t,)).to(dev).long(),
                context=conditioning,
            )
            image, _ = scheduler.step(out, t, image)
        sample_s = time.perf_counter() - t0
        sample = autoencoder.decode_stage_2_outputs(image)  # its autocast() is CUDA's: fp32 here
    seconds = time.perf_counter() - t0
    return {
        "path": "bundle",
        "settings": "DDIM 50 fp32, whole decode",
        "load_s": load_s,
        "seconds": seconds,
        "denoise_s": sample_s,
        "decode_s": seconds - sample_s,
        "shape": list(sample.shape[2:]),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def arithmetic_floor_child(threads: int, steps: int, precision: str) -> dict:
    """What the default settings cost in arithmetic and the least time this machine can do it in: FLOPs of one
    UNet step and of the decoding (`torch.utils.flop_counter`, as bench_layout counts them) at the convolution
    peak measured here for ``precision``. No kernel beats that peak; only less arithmetic (fewer steps) could."""
    from bench_layout import conv_peak
    from common import count_flops
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from napari_meddiff.runtime.precision import PRECISION_DTYPES
    from napari_meddiff.testing.bundle_fixtures import brain_ldm_inference, network_kwargs

    torch.set_num_threads(threads)
    cfg = brain_ldm_inference(full_size=True)
    with torch.device("meta"), torch.inference_mode():  # shapes only: FLOPs are counted without computing
        unet = DiffusionModelUNet(**network_kwargs(cfg["diffusion_def"])).eval()
        ae = AutoencoderKL(**network_kwargs(cfg["autoencoder_def"])).eval()
        unet_in, context = torch.zeros(1, 7, 20, 28, 20), torch.zeros(1, 1, 4)
        unet_flops = count_flops(lambda: unet(unet_in, timesteps=torch.tensor([500]), context=context))
        decode_flops = count_flops(lambda: ae.decode_stage_2_outputs(torch.zeros(1, 3, 20, 28, 20)))
    peak = conv_peak(PRECISION_DTYPES[precision])["peak"]
    total = steps * unet_flops + decode_flops
    return {
        "precision": precision,
        "steps": steps,
        "unet_step_tflop": unet_flops / 1e12,
        "decode_tflop": decode_flops / 1e12,
        "total_tflop": total / 1e12,
        "conv_peak_gflop_per_s": peak / 1e9,
        "floor_s": total / peak,
        "peak_needed_for_30_s_gflop_per_s": total / 30 / 1e9,
    }


def ours_child(folder: str, threads: int, device: str) -> dict:
    from napari_meddiff.cli.options import load_model_for
    from napari_meddiff.tasks.generate import generate

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_model_for(folder, torch.device(device), None, "generate")  # held as the CLI holds it
    load_s = time.perf_counter() - t0
    phase_peaks = {"load_gb": peak_rss_mb() / 1024}  # each phase's own peak RSS (VmHWM reset between phases)
    reset_peak_rss()
    marks: list[float] = []

    def on_step(info) -> None:
        marks.append(time.perf_counter())
        if info.index == info.total:
            phase_peaks["denoise_gb"] = peak_rss_mb() / 1024
            reset_peak_rss()

    t0 = time.perf_counter()
    (vol,) = generate(model, [0], device=device, conditions=CONDITIONS, on_step=on_step)
    seconds = time.perf_counter() - t0
    phase_peaks["decode_gb"] = peak_rss_mb() / 1024
    prov = vol.metadata["provenance"]
    return {
        "path": "ours",
        "settings": f"{prov['sampler']} {prov['steps']} {prov['precision']}, default decode",
        "steps": prov["steps"],
        "precision": prov["precision"],
        "autoencoder_pass": prov.get("autoencoder_pass"),
        "load_s": load_s,
        "seconds": seconds,
        "denoise_s": marks[-1] - t0,
        "decode_s": t0 + seconds - marks[-1],
        "shape": list(vol.array.shape),
        "voxel_mm": [float(abs(vol.affine[i, i])) for i in range(3)],
        "peak_rss_mb": 1024 * max(phase_peaks.values()),
        "phase_peak_rss_gb": phase_peaks,
        "threads": torch.get_num_threads(),
    }


def cli_row(folder: str, threads: int, device: str, decode: str) -> dict:
    """``meddiff generate --model BUNDLE --num 1`` in a fresh process: wall time from start to exit (imports,
    weight loading and writing the NIfTI included) and its peak RSS."""
    import os
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        args = [
            sys.executable,
            "-c",
            CLI_WITH_PEAK,
            str(peak_file),
            "generate",
            "--model",
            folder,
            "--num",
            "1",
            "--out",
            str(Path(tmp) / "out"),
            "--device",
            device,
            "--decode",
            decode,
        ]
        for name, value in CONDITIONS.items():
            args += ["--condition", f"{name}={value}"]
        env = {**os.environ, "MEDDIFF_THREADS": str(threads)}
        t0 = time.perf_counter()
        subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        written = sorted((Path(tmp) / "out").glob("*.nii.gz"))
        return {
            "path": f"meddiff generate (CLI), --decode {decode}",
            "settings": "model defaults",
            "seconds": seconds,
            "peak_rss_mb": int(peak_file.read_text()) / 1024,
            "threads": threads,
            "files_written": len(written),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths: a quick check that the script runs")
    parser.add_argument("--keep", type=Path, default=None, help="write the bundle here (default: a temporary folder)")
    parser.add_argument(
        "--cli-repeats",
        type=int,
        default=0,
        metavar="N",
        help="only the `--decode auto` CLI row, N times: its spread (results/bundle_cli_repeats.json)",
    )
    args = parser.parse_args()
    from napari_meddiff.testing.bundle_fixtures import write_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.keep or Path(tmp)) / BUNDLE
        t0 = time.perf_counter()
        if not (folder / "models" / "model.pt").is_file():
            write_bundle(folder, "brain_ldm", full_size=not args.tiny)
        print(f"full-size bundle with random weights in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
        busy = others_cpu_use()
        if args.cli_repeats:
            rows = [cli_row(str(folder), args.threads, args.device, "auto") for _ in range(args.cli_repeats)]
            print(table(rows, ["path", "seconds", "peak_rss_mb", "files_written"]), flush=True)
            payload = {"machine": machine(), "others_cpu_cores_busy_before": busy, "rows": rows}
            print(f"wrote {save('bundle_cli_repeats', payload)}")
            return
        rows = []
        for child in (bundle_path_child, ours_child):
            rows.append(in_fresh_process(child, str(folder), args.threads, args.device))
            print(
                table(rows[-1:], ["path", "settings", "seconds", "denoise_s", "decode_s", "load_s", "peak_rss_mb"]),
                flush=True,
            )
        for decode in ("auto", "whole"):
            rows.append(cli_row(str(folder), args.threads, args.device, decode))
            print(table(rows[-1:], ["path", "seconds", "peak_rss_mb", "files_written"]), flush=True)
    baseline = rows[0]["seconds"] + rows[0]["load_s"]  # the bundle's path, loading included, imports not
    ratios = {row["path"]: baseline / row["seconds"] for row in rows[2:]}
    for row in rows[2:]:
        print(
            f"{row['path']}: {ratios[row['path']]:.1f}x faster than the bundle's own path with its loading "
            f"(imports not counted for the bundle); peak RSS {row['peak_rss_mb'] / 1024:.1f} against "
            f"{rows[0]['peak_rss_mb'] / 1024:.1f} GB",
            flush=True,
        )
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    floor = None
    if args.device == "cpu" and not args.tiny:
        floor = in_fresh_process(arithmetic_floor_child, args.threads, rows[1]["steps"], rows[1]["precision"])
        ours = rows[1]["denoise_s"] + rows[1]["decode_s"]
        floor["ours_in_process_fraction_of_floor"] = floor["floor_s"] / ours
        print(
            f"arithmetic at default settings: {floor['steps']} UNet steps x {floor['unet_step_tflop']:.2f} + decoding "
            f"{floor['decode_tflop']:.2f} = {floor['total_tflop']:.1f} TFLOP; at this machine's {floor['precision']} "
            f"convolution peak ({floor['conv_peak_gflop_per_s']:.0f} GFLOP/s) no less than {floor['floor_s']:.0f} s "
            f"(ours in-process: {ours:.0f} s, {100 * floor['ours_in_process_fraction_of_floor']:.0f} % of peak); "
            f"30 s would need {floor['peak_needed_for_30_s_gflop_per_s']:.0f} GFLOP/s",
            flush=True,
        )
    path = save(
        "bundle_tiny" if args.tiny else "bundle",
        {
            "machine": machine(),
            "others_cpu_cores_busy_before": busy,
            "bundle": BUNDLE,
            "conditions": CONDITIONS,
            "rows": rows,
            "ratio_in_process_sampling": ratio,
            "ratio_cli_vs_bundle_with_loading": ratios,
            "arithmetic_floor": floor,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
