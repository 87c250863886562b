"""CPU memory layout for the big 3D networks (issue 15, item 2): PyTorch's default NCDHW layout against ours.

The full-size MONAI Zoo brain LDM architecture (``brain_image_synthesis_latent_diffusion_model``: UNet
[256, 512, 768] on a 3x20x28x20 latent with its 4 conditions as channels and as context; AutoencoderKL
[64, 128, 128, 128] decoding to 160x224x160), random weights, batch 1. Options, each on the same weights:

* ``default``: what `load_model` gave before: NCDHW, fp32 convolutions routed to oneDNN (`prefer_onednn`);
* ``ours``: `prefer_channels_last` as well (channels_last_3d weights and activations, thread-invariant
  GroupNorm, thread-invariant linear layers): what `load_model` does on a CPU with native bf16; and for the UNet
  in bf16, `bf16_weights_once` (bf16 weight copies made once; on AMX, convolutions of more than 256 input
  channels in 256-channel chunks), as the denoising loop runs it.

Printed per network and precision: wall seconds, GFLOP/s (FLOPs counted by `torch.utils.flop_counter` on
PyTorch's own convolutions) and the fraction of this machine's 3x3x3 convolution peak for that precision (a
128-channel convolution, the faster of both layouts); the ratio default/ours; and whether ours gives the
same bits with 1 and N threads (the napari widget leaves a core to the GUI). Usage:

    python benchmarks/bench_layout.py [--threads 2] [--full-decode-precisions bf16] [--skip-full-decode]
    python benchmarks/bench_layout.py --networks "decode 160x224x160" "decode 160x224x160 tiled"   # some rows
    python benchmarks/bench_layout.py --convs-only   # bf16 convolutions: one against 256-channel chunks
    python benchmarks/bench_layout.py --linears      # the UNet step's linear layers: ours, one thread, PyTorch's N

Writes ``results/layout.json`` (``--convs-only``: ``results/layout_convs.json``; ``--linears``:
``results/layout_linears.json``; ``--networks``: ``results/layout_<rows>.json``, e.g.
``layout_unet_full_full_tiled.json``). The full-size decode is timed as one whole pass and as the exact tiled
pass (`napari_meddiff.autoencoder.tiling`, default tile) that ``meddiff generate`` runs where a whole pass would
not fit in half the free memory. Run it with nothing else busy on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, machine, others_cpu_use, peak_rss_mb, precisions_for, save, table, timed  # noqa: E402


def conv_peak(dtype: torch.dtype) -> dict:
    """FLOP/s of a 128-channel 3x3x3 convolution (1x128x24x32x24) in each layout, and the higher one."""
    conv = torch.nn.Conv3d(128, 128, 3, padding=1, bias=False).to(dtype)
    x = torch.randn(1, 128, 24, 32, 24, dtype=dtype)
    flops = 2 * 128 * 128 * 27 * x[0, 0].numel()
    out = {}
    with torch.inference_mode():
        out["contiguous"] = flops / timed(lambda: conv(x), repeat=5, warmup=2)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        out["channels_last_3d"] = flops / timed(lambda: conv(xc), repeat=5, warmup=2)
    out["peak"] = max(out.values())
    return out


CONV_SHAPES = [
    (256, 256, (20, 28, 20)),
    (448, 448, (20, 28, 20)),
    (512, 512, (20, 28, 20)),
    (1280, 512, (10, 14, 10)),
    (1536, 768, (5, 7, 5)),
]  # (in, out, spatial): the Zoo UNet's, and 448


def conv_rows() -> list[dict]:
    """bf16 channels_last_3d 3x3x3 convolutions of the Zoo UNet's widths: one convolution against the same work
    in 256-input-channel chunks (`cpu_kernels.bf16_weights_once` on AMX)."""
    from napari_meddiff.runtime import devices
    from napari_meddiff.runtime.cpu_kernels import bf16_weights_once, prefer_channels_last, prefer_onednn

    rows = []
    for cin, cout, shape in CONV_SHAPES:
        conv = prefer_channels_last(prefer_onednn(torch.nn.Sequential(torch.nn.Conv3d(cin, cout, 3, padding=1))))
        x = torch.randn(1, cin, *shape).contiguous(memory_format=torch.channels_last_3d)
        flops = 2 * cin * cout * 27 * x[0, 0].numel()
        row = {"in": cin, "out": cout, "spatial": "x".join(map(str, shape))}
        for option in ("one convolution", "256-channel chunks"):
            saved = devices.cpu_has_amx
            devices.cpu_has_amx = lambda: option != "one convolution"  # noqa: B023 (restored below, this iteration)
            try:
                with (
                    torch.inference_mode(),
                    torch.autocast("cpu", dtype=torch.bfloat16),
                    bf16_weights_once(conv, "bf16", torch.device("cpu")),
                ):
                    seconds = timed(lambda: conv(x), repeat=3, warmup=1)  # noqa: B023 (timed calls it before returning)
            finally:
                devices.cpu_has_amx = saved
            row[f"{option} ms"] = seconds * 1e3
            row[f"{option} GFLOP/s"] = flops / seconds / 1e9
        rows.append(row)
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


ZOO_UNET_LINEARS = [  # (input shape, in, out, calls per UNet step) of the Zoo brain LDM's UNet, batch 1
    ((1, 175, 768), 768, 768, 36),
    ((1, 1400, 512), 512, 512, 30),
    ((1, 175, 768), 768, 6144, 6),
    ((1, 175, 3072), 3072, 768, 6),
    ((1, 1400, 512), 512, 4096, 5),
    ((1, 1400, 2048), 2048, 512, 5),
]


def linear_rows(threads: int, repeat: int = 4) -> list[dict]:
    """bf16 seconds per UNet step spent in its (token) linear layers: `thread_invariant_linear` (the same bits for
    any thread count: one thread each, large products as two fixed halves on two threads) against all of them
    in one thread and against PyTorch's own ``threads`` threads (whose sums, and so bits, depend on the thread
    count); alternated ``repeat`` times, medians."""
    import copy
    import statistics
    import time

    from napari_meddiff.runtime.cpu_kernels import one_thread, thread_invariant_linear

    plain = [
        (torch.nn.Linear(i, o).bfloat16(), torch.randn(*shape).bfloat16(), n) for shape, i, o, n in ZOO_UNET_LINEARS
    ]
    invariant = [(thread_invariant_linear(copy.deepcopy(lin)), x, n) for lin, x, n in plain]

    def step(layers, context=contextlib.nullcontext):
        with context():
            for lin, x, n in layers:
                for _ in range(n):
                    lin(x)

    runs = {
        "thread-invariant (ours)": (invariant, contextlib.nullcontext),
        "one thread": (plain, one_thread),
        f"PyTorch, {threads} threads": (plain, contextlib.nullcontext),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeat):
            for name, (layers, context) in runs.items():
                step(layers, context)
                t = time.perf_counter()
                step(layers, context)
                times[name].append(time.perf_counter() - t)
    return [
        {"linear layers of one UNet step (bf16)": name, "median_s": statistics.median(v), "min_s": min(v)}
        for name, v in times.items()
    ]


def networks(layout: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn, thread_invariant_linear
    from napari_meddiff.testing.bundle_fixtures import brain_ldm_inference, network_kwargs

    cfg = brain_ldm_inference(full_size=True)
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**network_kwargs(cfg["diffusion_def"])).eval().requires_grad_(False)
    ae = AutoencoderKL(**network_kwargs(cfg["autoencoder_def"])).eval().requires_grad_(False)
    for net in (unet, ae):
        for param in net.parameters():  # MONAI zero-initialises output convolutions (the UNet's output would be 0)
            if not param.any() and param.ndim > 1:
                torch.nn.init.normal_(param, std=0.02)
        prefer_onednn(net)
        if layout == "ours":
            prefer_channels_last(thread_invariant_linear(net))
    return unet, ae


def main() -> None:
    from napari_meddiff.autoencoder.tiling import tiled_decode
    from napari_meddiff.runtime.cpu_kernels import bf16_weights_once, pytorch_kernels
    from napari_meddiff.runtime.precision import PRECISION_DTYPES, autocast_context

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-decode-precisions", nargs="+", default=["bf16"])
    ap.add_argument("--skip-full-decode", action="store_true")
    ap.add_argument(
        "--networks",
        nargs="+",
        choices=("unet step", "decode 80x112x80", "decode 160x224x160", "decode 160x224x160 tiled"),
        help="only these rows",
    )
    ap.add_argument(
        "--convs-only", action="store_true", help="only the per-convolution rows (results/layout_convs.json)"
    )
    ap.add_argument(
        "--linears", action="store_true", help="only the UNet step's linear layers (results/layout_linears.json)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    precisions = precisions_for(cpu)
    busy = others_cpu_use()
    print(f"other processes were using {busy:.1f} cores", flush=True)
    if args.linears:
        rows = linear_rows(args.threads)
        print(table(rows, list(rows[0])))
        payload = {"machine": machine(), "threads": args.threads, "others_cpu_cores_busy_before": busy, "rows": rows}
        print(f"written {save('layout_linears', payload)}")
        return
    peaks = {p: conv_peak(PRECISION_DTYPES[p]) for p in precisions}
    for p, v in peaks.items():
        print(
            f"{p} 3x3x3 conv peak: {v['contiguous'] / 1e9:.0f} GFLOP/s NCDHW, "
            f"{v['channels_last_3d'] / 1e9:.0f} GFLOP/s channels_last_3d",
            flush=True,
        )

    if args.convs_only:
        if "bf16" in precisions:
            path = save(
                "layout_convs",
                {
                    "machine": machine(),
                    "threads": args.threads,
                    "others_cpu_cores_busy_before": busy,
                    "conv_peak_flop_per_s": peaks,
                    "rows": conv_rows(),
                },
            )
            print(f"written {path}")
        return

    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 3, 20, 28, 20, generator=gen)
    half_latent = torch.randn(1, 3, 10, 14, 10, generator=gen)
    context = torch.rand(1, 1, 4, generator=gen)
    unet_in = torch.cat(
        [latent, context.reshape(1, 4, 1, 1, 1).expand(1, 4, 20, 28, 20)], 1
    )  # + conditions as channels
    t = torch.tensor([500])
    nets = {layout: networks(layout) for layout in ("default", "ours")}
    unet0, ae0 = nets["default"]
    with torch.inference_mode(), pytorch_kernels(unet0, ae0):
        flops = {
            "unet step": count_flops(lambda: unet0(unet_in, timesteps=t, context=context)),
            "decode 80x112x80": count_flops(lambda: ae0.decode_stage_2_outputs(half_latent)),
        }
    flops["decode 160x224x160"] = flops["decode 80x112x80"] * 8  # the same layers on 8x the voxels
    flops["decode 160x224x160 tiled"] = flops["decode 160x224x160"]  # what `--decode auto` runs on this machine

    def cases(layout):
        unet, ae = nets[layout]
        return {
            "unet step": (lambda: unet(unet_in, timesteps=t, context=context), 3, 1),
            "decode 80x112x80": (lambda: ae.decode_stage_2_outputs(half_latent), 2, 1),
            "decode 160x224x160": (lambda: ae.decode_stage_2_outputs(latent), 1, 0),
            "decode 160x224x160 tiled": (lambda: tiled_decode(ae, latent), 1, 0),
        }

    rows, outputs = [], {}
    for network in flops:
        if args.networks and network not in args.networks:
            continue
        for precision in precisions:
            if network.startswith("decode 160x224x160") and (
                args.skip_full_decode or precision not in args.full_decode_precisions
            ):
                continue
            row = {"network": network, "precision": precision, "gflop": flops[network] / 1e9}
            for layout in ("default", "ours"):
                fn, repeat, warmup = cases(layout)[network]
                loop = (
                    bf16_weights_once(nets["ours"][0], precision, cpu)
                    if layout == "ours" and network == "unet step"
                    else contextlib.nullcontext()
                )
                with torch.inference_mode(), autocast_context(cpu, precision), loop:
                    seconds = timed(fn, repeat=repeat, warmup=warmup)
                    if not network.startswith("decode 160x224x160"):
                        outputs[(network, precision, layout, args.threads)] = fn().float()
                row[f"{layout}_s"] = seconds
                row[f"{layout}_fraction_of_conv_peak"] = flops[network] / seconds / peaks[precision]["peak"]
            row["speedup"] = row["default_s"] / row["ours_s"]
            row["ours_gflop_per_s"] = flops[network] / row["ours_s"] / 1e9
            if not network.startswith("decode 160x224x160"):  # ours with 1 thread: the same bits?
                torch.set_num_threads(1)
                fn = cases("ours")[network][0]
                loop = (
                    bf16_weights_once(nets["ours"][0], precision, cpu)
                    if network == "unet step"
                    else contextlib.nullcontext()
                )
                with torch.inference_mode(), autocast_context(cpu, precision), loop:
                    one = fn().float()
                torch.set_num_threads(args.threads)
                row["ours_same_bits_1_vs_n_threads"] = bool(
                    torch.equal(one, outputs[(network, precision, "ours", args.threads)])
                )
                row["max_abs_diff_ours_vs_default"] = float(
                    (
                        outputs[(network, precision, "ours", args.threads)]
                        - outputs[(network, precision, "default", args.threads)]
                    )
                    .abs()
                    .max()
                )
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)
    short = {
        "unet step": "unet",
        "decode 80x112x80": "half",
        "decode 160x224x160": "full",
        "decode 160x224x160 tiled": "full_tiled",
    }
    name = "layout" if not args.networks else "layout_" + "_".join(short[n] for n in args.networks)
    path = save(
        name,
        {
            "machine": machine(),
            "threads": args.threads,
            "others_cpu_cores_busy_before": busy,
            "conv_peak_flop_per_s": peaks,
            "rows": rows,
            "peak_rss_mb": peak_rss_mb(),
        },
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
