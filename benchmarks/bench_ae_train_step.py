"""Seconds per training step (forward, loss, backward, Adam) of a config's autoencoder (L1 + KL loss) or
diffusion UNet (MSE, with its conditions as context when it takes them), under each precision and memory
layout, on random input of a crop or whole-volume size (for the UNet of a latent model: the latent size).

    python benchmarks/bench_ae_train_step.py --config models/brain-ldm-3d/train-2mm.yaml \
        [--sizes 64,64,64 96,112,96] [--batch 1] [--threads 1] [--repeats 3]
    python benchmarks/bench_ae_train_step.py --network unet --batch 8 --sizes 24,28,24 \
        --config models/brain-ldm-3d/training/train-2mm-conditional.yaml

Precisions: fp32, plus bf16 autocast on CPUs with native bf16; layouts: contiguous (NCDHW) and
channels_last_3d. Prints a table and writes ``benchmarks/results/ae_train_step.json`` (``unet_train_step.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_meddiff.models import build_network  # noqa: E402
from napari_meddiff.runtime.devices import cpu_supports_bf16  # noqa: E402
from napari_meddiff.training.autoencoder import generator_step_loss  # noqa: E402
from napari_meddiff.training.config import load_config  # noqa: E402
from napari_meddiff.training.device_setup import LAYOUTS, autocast, machine_description, to_layout

RESULTS = Path(__file__).parent / "results"


def step_loss(network: str, net: torch.nn.Module, net_cfg: dict, batch: int, size: list[int], layout: str):
    """A function computing one training loss of ``net`` on fixed random input."""
    if network == "autoencoder":
        x = to_layout(torch.rand(batch, 1, *size), layout)
        return lambda: generator_step_loss(net, x, kl_weight=1e-6)[0]
    x = to_layout(torch.randn(batch, int(net_cfg["in_channels"]), *size), layout)
    t = torch.randint(0, 1000, (batch,))
    extra = (
        {"context": torch.rand(batch, 1, int(net_cfg["cross_attention_dim"]))}
        if net_cfg.get("with_conditioning")
        else {}
    )
    target = torch.randn(batch, int(net_cfg["out_channels"]), *size)
    return lambda: torch.nn.functional.mse_loss(net(x, timesteps=t, **extra).float(), target)


def time_steps(
    network: str, net_cfg: dict, size: list[int], batch: int, precision: str, layout: str, repeats: int
) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` training steps after one warm-up step (on a shared machine
    the CPU seconds of this process are the steadier figure)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    net = to_layout(build_network(network, net_cfg), layout)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_of = step_loss(network, net, net_cfg, batch, size, layout)
    times, cpu = [], []
    for i in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(device, precision):
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return sorted(times)[len(times) // 2], sorted(cpu)[len(cpu) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("models/brain-ldm-3d/train-2mm.yaml"))
    ap.add_argument("--network", choices=["autoencoder", "unet"], default="autoencoder")
    ap.add_argument("--sizes", nargs="+", default=["64,64,64", "96,112,96"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    net_cfg = cfg["networks"][args.network]
    precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    rows = []
    for size in ([int(v) for v in s.split(",")] for s in args.sizes):
        for precision in precisions:
            for layout in LAYOUTS:
                s, c = time_steps(args.network, net_cfg, size, args.batch, precision, layout, args.repeats)
                rows.append(
                    {
                        "size": size,
                        "batch": args.batch,
                        "precision": precision,
                        "layout": layout,
                        "seconds": round(s, 3),
                        "cpu_seconds": round(c, 3),
                    }
                )
                print(
                    f"{'x'.join(map(str, size)):>12} b{args.batch} {precision:>5} {layout:>16}: {s:7.3f} s/step wall, "
                    f"{c:7.3f} s CPU",
                    flush=True,
                )
    out = {
        "config": str(args.config),
        "network": args.network,
        args.network: net_cfg,
        "threads": args.threads,
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "ae_train_step.json" if args.network == "autoencoder" else "unet_train_step.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
