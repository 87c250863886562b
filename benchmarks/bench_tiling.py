"""Exact tiled decoding of research-size autoencoders: time, peak RSS and agreement with the whole-volume pass.

Random weights of the real architectures (each run in a fresh process, peak RSS from ``VmHWM``, reset after the
model and latent are made):
- ``brain``: the MONAI Zoo brain LDM's AutoencoderKL (channels 64/128/128/128, 2 residual blocks per level, no
  attention), latent 3x20x28x20 -> 160x224x160; whole against tiled, fp32 and bf16;
- ``maisi``: MAISI's AutoencoderKlMaisi as maisi_ct_generative configures it (channels 64/128/256, no attention;
  ``norm_float16`` off: MONAI's own pass fails on the CPU with it), latent 4x64^3 -> 256^3 tiled (a whole pass is
  estimated at 40 GB, more than this machine has), and the storage a 4x128^3 -> 512^3 decode would need;
- ``maisi512`` (not in the default run: about an hour): that 512^3 decode, bf16, in ``channels_last_3d`` where
  the CPU has native bf16 (as `load_model` lays 3D networks out), activations past ``--ram-gib`` in files.

    python benchmarks/bench_tiling.py [--case brain maisi maisi512] [--threads 1] [--ram-gib 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_fresh_process, machine, others_cpu_use, peak_rss_mb, reset_peak_rss, save, table  # noqa: E402

from napari_meddiff.runtime.memory import available_ram_bytes  # noqa: E402

GIB = 2**30
WHOLE_BRAIN_GB = {"fp32": 13, "bf16": 9}  # measured by issue 15 on this machine (peak RSS of the whole decode)


def brain_autoencoder():
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(64, 128, 128, 128),
        latent_channels=3,
        num_res_blocks=2,
        norm_num_groups=32,
        norm_eps=1e-6,
        attention_levels=(False,) * 4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def maisi_autoencoder():
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        num_channels=[64, 128, 256],
        num_res_blocks=[2, 2, 2],
        norm_num_groups=32,
        norm_eps=1e-6,
        attention_levels=[False] * 3,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_checkpointing=False,
        use_convtranspose=False,
        norm_float16=False,
        num_splits=1,
        dim_split=1,
    )


def decode_child(
    case: str,
    latent: tuple,
    mode: str,
    precision: str,
    threads: int,
    ram_gib: float | None,
    keep_array: bool = True,
    layout: str = "default",
) -> dict:
    import torch

    from napari_meddiff.autoencoder import tiling
    from napari_meddiff.autoencoder.tiling import tiled_decode
    from napari_meddiff.runtime.precision import autocast_context

    if not keep_array:  # a long run: say when each step's store is made (one per convolution)
        made, start = tiling._Stores.new, time.perf_counter()

        def new(self, name, *args):
            print(f"  {time.perf_counter() - start:7.0f} s: {name} {args[:2]}", flush=True)
            return made(self, name, *args)

        tiling._Stores.new = new

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ae = (brain_autoencoder if case == "brain" else maisi_autoencoder)().eval()
    if layout == "channels_last":
        from napari_meddiff.runtime.cpu_kernels import prefer_channels_last

        prefer_channels_last(ae)
    z = torch.randn((1, *latent), generator=torch.Generator().manual_seed(1))
    reset_peak_rss()
    before = peak_rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast_context(z.device, precision):
        if mode == "whole":
            img = ae.decode_stage_2_outputs(z)
        else:
            img = tiled_decode(ae, z, ram_bytes=None if ram_gib is None else ram_gib * GIB)
    seconds = time.perf_counter() - t0
    img = img.float()[0, 0].numpy()
    row = {
        "case": case,
        "mode": mode,
        "precision": precision,
        "layout": layout,
        "ram_budget_gib": ram_gib,
        "threads": threads,
        "latent": list(latent),
        "image": list(img.shape),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "rss_before_gb": round(before / 1024, 2),
    }
    if keep_array:
        row["array"] = img
    else:
        row["image_range"] = [float(img.min()), float(img.max())]
        row["finite"] = bool(np.isfinite(img).all())
    return row


def plans() -> list[dict]:
    from napari_meddiff.autoencoder.tiling import decoder_steps, tiled_store_bytes, whole_pass_bytes

    rows = []
    for case, make, latent in (
        ("brain", brain_autoencoder, (20, 28, 20)),
        ("maisi", maisi_autoencoder, (64,) * 3),
        ("maisi", maisi_autoencoder, (128,) * 3),
    ):
        steps, _ = decoder_steps(make())
        rows.append(
            {
                "case": case,
                "latent": list(latent),
                "whole_estimate_gb": round(whole_pass_bytes(steps, 1, latent) / GIB, 1),
                "tiled_stores_fp32_gb": round(tiled_store_bytes(steps, latent, 4) / GIB, 1),
                "tiled_stores_bf16_gb": round(tiled_store_bytes(steps, latent, 2) / GIB, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", nargs="+", choices=("brain", "noise", "maisi", "maisi512"), default=["brain", "noise", "maisi"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--ram-gib",
        type=float,
        default=6.0,
        help="maisi512: activations past this many GiB go to files ($MEDDIFF_TILE_DIR or the temp dir)",
    )
    args = parser.parse_args()
    name = "tiling" if {"brain", "maisi"} <= set(args.case) else "tiling_" + "_".join(args.case)
    payload = {"machine": machine(), "others_busy_cores_at_start": others_cpu_use(), "plans": plans(), "runs": []}
    print(table(payload["plans"], list(payload["plans"][0])), flush=True)
    columns = [
        "case",
        "mode",
        "precision",
        "ram_budget_gib",
        "seconds",
        "peak_rss_gb",
        "max_abs_diff_vs_whole",
        "max_diff_over_range",
    ]
    runs = []
    if "brain" in args.case:
        latent = (3, 20, 28, 20)
        for precision in ("bf16", "fp32"):
            tiled = [
                in_fresh_process(decode_child, "brain", latent, "tiled", precision, args.threads, ram_gib)
                for ram_gib in (None, 1.0)
            ]  # stores in memory; stores past 1 GiB in files
            need = WHOLE_BRAIN_GB[precision] * GIB
            if available_ram_bytes() < 1.2 * need:  # other processes hold the memory: do not push them out
                runs.append(
                    {
                        "case": "brain",
                        "mode": "whole",
                        "precision": precision,
                        "skipped": f"{available_ram_bytes() / GIB:.1f} GiB free, {need / GIB:.0f} GB needed",
                    }
                )
            else:
                whole = in_fresh_process(decode_child, "brain", latent, "whole", precision, args.threads, None)
                ref = whole.pop("array")
                whole["image_range"] = [float(ref.min()), float(ref.max())]
                runs.append(whole)
                for r in tiled:  # issue 15's criterion is on [0, 1] intensities: also relative to the range
                    r["max_abs_diff_vs_whole"] = float(np.abs(r["array"] - ref).max())
                    r["max_diff_over_range"] = r["max_abs_diff_vs_whole"] / float(ref.max() - ref.min())
            for r in tiled:
                r.pop("array")
            runs += tiled
            print(table(runs[-3:], columns), flush=True)
            save(name, {**payload, "runs": runs})
    if "noise" in args.case:  # is tiled-vs-whole in bf16 more than bf16's own rounding? (half-size brain decode)
        latent = (3, 10, 14, 10)
        ref = in_fresh_process(decode_child, "brain", latent, "whole", "fp32", args.threads, None)["array"]
        arrays = {
            m: in_fresh_process(decode_child, "brain", latent, m, "bf16", args.threads, None)["array"]
            for m in ("whole", "tiled")
        }
        span = float(ref.max() - ref.min())
        noise = {
            "case": "noise",
            "latent": list(latent),
            "image_range_fp32": span,
            "whole_bf16_vs_whole_fp32": float(np.abs(arrays["whole"] - ref).max()),
            "tiled_bf16_vs_whole_fp32": float(np.abs(arrays["tiled"] - ref).max()),
            "tiled_bf16_vs_whole_bf16": float(np.abs(arrays["tiled"] - arrays["whole"]).max()),
        }
        payload["bf16_noise"] = noise
        print(table([noise], list(noise)), flush=True)
    if "maisi" in args.case:
        r = in_fresh_process(decode_child, "maisi", (4, 64, 64, 64), "tiled", "bf16", args.threads, None)
        image = r.pop("array")
        r["image_range"] = [float(image.min()), float(image.max())]
        runs.append(r)
        print(table(runs[-1:], columns), flush=True)
    if "maisi512" in args.case:  # issue 15's MAISI-size target: 4x128^3 -> 512^3, bf16, on this machine
        import torch

        from napari_meddiff.runtime.devices import native_bf16

        layout = "channels_last" if native_bf16(torch.device("cpu")) else "default"  # as load_model lays it out
        r = in_fresh_process(
            decode_child, "maisi", (4, 128, 128, 128), "tiled", "bf16", args.threads, args.ram_gib, False, layout
        )
        runs.append(r)
        print(table(runs[-1:], columns + ["image_range", "finite"]), flush=True)
    payload["runs"] = runs
    payload["others_busy_cores_at_end"] = others_cpu_use()
    print(f"saved {save(name, payload)}")


if __name__ == "__main__":
    main()
