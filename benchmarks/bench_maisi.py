"""MAISI at real scale on this machine (issue 38, item 5): a CT from a label map through ``meddiff generate``.

A ``maisi_ct_generative`` 1.0 bundle folder with the published networks (autoencoder 64/128/256, UNet and
ControlNet 64/128/256/512 with attention at the two deepest levels; random weights in the Zoo's checkpoint
layout, `napari_meddiff.testing.maisi_bundles`) generates from a synthetic abdominal label map (body, liver,
spleen, kidneys) of each requested size, at MAISI's spacing (1.5 x 1.5 x 2.0 mm), through the command a user
runs: ``meddiff generate --model BUNDLE --labels MAP --sampler rflow --steps 30``, in a fresh process, start to
exit, with its peak RSS (``VmHWM``). Precision: bf16 where the CPU has native bf16, else fp32 (``--precision
auto``); ``--decode auto`` (tiled only where a whole pass would not fit).

Beside each row, the arithmetic: FLOPs of one ControlNet + UNet step at the latent size and of the decoding
(`torch.utils.flop_counter`, shapes only), and the least time this machine's measured convolution peak allows
(``floor_s``). The published A100 figures (MAISI-v2: 256x256x128 in about 3 s, 512^3 in about 48 s) are GPU
figures; on a lent GPU run this with ``--device cuda``.

    python benchmarks/bench_maisi.py                         # 256x256x128 (tens of minutes on 2 cores)
    python benchmarks/bench_maisi.py --size 512x512x256      # hours on 2 cores
    python benchmarks/bench_maisi.py --size 64x64x32 --steps 2 --no-save   # a check that the script runs

Writes ``benchmarks/results/maisi_<size>.json``.
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
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CLI_WITH_PEAK, count_flops, in_fresh_process, machine, others_cpu_use, save  # noqa: E402

SPACING = (1.5, 1.5, 2.0)  # MAISI's default output spacing (mm)
ORGANS = {"liver": 1, "spleen": 3, "right kidney": 5, "left kidney": 14}  # values of MAISI's label_dict.json
BODY = 200  # MAISI's body without an organ label


def abdomen_map(shape: tuple[int, int, int], path: Path) -> Path:
    """A body (MAISI's label 200) filling the field of view as a CT's does, with a liver, a spleen and two
    kidneys, on a RAS grid of ``shape`` at MAISI's spacing. meddiff generates on a grid covering the labelled
    voxels: the body makes that grid the whole of ``shape``."""
    import nibabel as nib

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    x, y, z = grid
    values = np.zeros(shape, np.int16)
    values[((x / 0.97) ** 2 + (y / 0.97) ** 2 < 1) & (np.abs(z) < 0.97)] = BODY
    values[((x + 0.35) / 0.35) ** 2 + ((y - 0.1) / 0.3) ** 2 + (z / 0.8) ** 2 < 1] = ORGANS["liver"]
    values[((x - 0.45) / 0.15) ** 2 + ((y - 0.2) / 0.15) ** 2 + (z / 0.4) ** 2 < 1] = ORGANS["spleen"]
    for side, value in ((-0.25, ORGANS["right kidney"]), (0.25, ORGANS["left kidney"])):
        values[((x - side) / 0.1) ** 2 + ((y + 0.35) / 0.12) ** 2 + ((z + 0.2) / 0.3) ** 2 < 1] = value
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.array(SPACING) * (np.array(shape) - 1) / 2
    nib.save(nib.Nifti1Image(values, affine), str(path))
    return path


def generation_grid(folder: Path, label_map: Path) -> list[int]:
    """The grid meddiff generates ``label_map`` on (what the arithmetic is counted at)."""
    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.models import describe_model
    from napari_meddiff.tasks.from_labels import label_grid

    return [int(n) for n in label_grid(describe_model(folder), read_volume(label_map)).shape]


def arithmetic(folder: str, size: tuple[int, int, int], steps: int, threads: int, precision: str) -> dict:
    """FLOPs of one ControlNet + UNet step and of the decoding at ``size``, and the floor at the measured peak."""
    from bench_layout import conv_peak
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    from napari_meddiff.runtime.precision import PRECISION_DTYPES

    torch.set_num_threads(threads)
    config = json.loads((Path(folder) / "configs" / "inference.json").read_text())

    def kwargs(key: str) -> dict:
        raw = {k: v for k, v in config[key].items() if not k.startswith("_")}
        raw = {k: config[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in raw.items()}
        return {**raw, "use_flash_attention": False} if "use_flash_attention" in raw else raw

    latent = (1, 4, *(s // 4 for s in size))
    with torch.device("meta"), torch.inference_mode():
        unet = DiffusionModelUNetMaisi(**kwargs("diffusion_unet_def")).eval()
        controlnet = ControlNetMaisi(**kwargs("controlnet_def")).eval()
        ae = AutoencoderKlMaisi(**{**kwargs("autoencoder_def"), "norm_float16": False, "num_splits": 1}).eval()
        x, t = torch.zeros(latent), torch.tensor([500.0])
        inputs = {"spacing_tensor": torch.zeros(1, 3), "class_labels": torch.zeros(1, dtype=torch.long)}

        def step():
            down, mid = controlnet(
                x,
                t,
                controlnet_cond=torch.zeros(1, 8, *size),
                conditioning_scale=1.0,
                class_labels=inputs["class_labels"],
            )
            unet(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)

        step_flops = count_flops(step)
        decode_flops = count_flops(lambda: ae.decode(torch.zeros(latent)))
    peak = conv_peak(PRECISION_DTYPES[precision])["peak"]
    total = steps * step_flops + decode_flops
    return {
        "precision": precision,
        "step_tflop": step_flops / 1e12,
        "decode_tflop": decode_flops / 1e12,
        "total_tflop": total / 1e12,
        "conv_peak_gflop_per_s": peak / 1e9,
        "floor_s": total / peak,
    }


def cli_run(folder: Path, label_map: Path, steps: int, device: str, threads: int, out: Path) -> dict:
    """``meddiff generate --model BUNDLE --labels MAP`` in a fresh process: wall seconds, peak RSS, the sidecar."""
    peak_file = out / "peak_kb"
    args = [sys.executable, "-c", CLI_WITH_PEAK, str(peak_file), "generate", "--model", str(folder)]
    args += ["--labels", str(label_map), "--out", str(out / "ct"), "--sampler", "rflow", "--steps", str(steps)]
    args += ["--device", device, "--precision", "auto"]
    env = {**os.environ, "MEDDIFF_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"meddiff generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    sidecar = json.loads(next((out / "ct").glob("*.json")).read_text())
    return {
        "seconds": seconds,
        "peak_rss_gb": int(peak_file.read_text()) / 1024**2,
        "precision": sidecar.get("precision"),
        "autoencoder_pass": sidecar.get("autoencoder_pass"),
        "sampler": sidecar.get("sampler"),
        "steps": sidecar.get("steps"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256x128", help="output size, e.g. 256x256x128 or 512x512x256")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", type=Path, default=None, help="write the bundle here (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true", help="print only (a check run)")
    args = parser.parse_args(argv)
    size = tuple(int(n) for n in args.size.lower().split("x"))
    if len(size) != 3 or any(n % 4 for n in size):
        raise SystemExit("--size: three sides divisible by 4, e.g. 256x256x128")
    result = {"benchmark": "maisi", "machine": machine(), "others_busy_cores_before": others_cpu_use()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.keep or work / "maisi_ct_generative"
        if not (folder / "configs" / "inference.json").is_file():
            from napari_meddiff.testing.maisi_bundles import write_maisi_bundle

            t0 = time.perf_counter()
            write_maisi_bundle(folder, "1.0", full_size=True)
            print(f"full-size bundle written in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
        label_map = abdomen_map(size, work / "abdomen_labels.nii.gz")
        grid = generation_grid(folder, label_map)
        if grid != list(size):
            print(f"note: meddiff generates this map on a {'x'.join(map(str, grid))} grid", flush=True)
        run = cli_run(folder, label_map, args.steps, args.device, args.threads, work)
        precision = run["precision"] if run["precision"] in ("fp32", "bf16") else "fp32"
        floor = in_fresh_process(arithmetic, str(folder), tuple(grid), args.steps, args.threads, precision)
    result.update(size=list(size), generation_grid=grid, spacing_mm=list(SPACING), steps=args.steps)
    result.update(threads=args.threads)
    result.update(cli=run, arithmetic=floor, over_floor=run["seconds"] / floor["floor_s"])
    print(json.dumps(result, indent=2))
    if not args.no_save:
        print("written:", save(f"maisi_{args.size.lower()}", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
