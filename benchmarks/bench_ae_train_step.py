"""Seconds per autoencoder training step (forward, L1 + KL loss, backward, Adam) under each precision and
memory layout, on random input of a crop or whole-volume size.

    python benchmarks/bench_ae_train_step.py --config models/brain-ldm-3d/train-2mm.yaml \
        [--sizes 64,64,64 96,112,96] [--batch 1] [--threads 1] [--repeats 3]

Precisions: fp32, plus bf16 autocast on CPUs with native bf16; layouts: contiguous (NCDHW) and
channels_last_3d. Prints a table and writes ``benchmarks/results/ae_train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_meddiff.devices import cpu_supports_bf16  # noqa: E402
from napari_meddiff.training import common  # noqa: E402
from napari_meddiff.training.autoencoder import generator_step_loss  # noqa: E402
from napari_meddiff.training.config import load_config  # noqa: E402
from napari_meddiff.zoo import build_network  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def time_steps(net_cfg: dict, size: list[int], batch: int, precision: str, layout: str, repeats: int
               ) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` training steps after one warm-up step (on a shared machine
    the CPU seconds of this process are the steadier figure)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    ae = common.to_layout(build_network("autoencoder", net_cfg), layout)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-4)
    x = common.to_layout(torch.rand(batch, 1, *size), layout)
    times, cpu = [], []
    for i in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with common.autocast(device, precision):
            loss, _, _, _ = generator_step_loss(ae, x, kl_weight=1e-6)
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
    ap.add_argument("--sizes", nargs="+", default=["64,64,64", "96,112,96"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    net_cfg = cfg["networks"]["autoencoder"]
    precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    rows = []
    for size in ([int(v) for v in s.split(",")] for s in args.sizes):
        for precision in precisions:
            for layout in common.LAYOUTS:
                s, c = time_steps(net_cfg, size, args.batch, precision, layout, args.repeats)
                rows.append({"size": size, "batch": args.batch, "precision": precision, "layout": layout,
                             "seconds": round(s, 3), "cpu_seconds": round(c, 3)})
                print(f"{'x'.join(map(str, size)):>12} b{args.batch} {precision:>5} {layout:>16}: {s:7.3f} s/step wall, "
                      f"{c:7.3f} s CPU", flush=True)
    out = {"config": str(args.config), "autoencoder": net_cfg, "threads": args.threads,
           "machine": common.machine_description(torch.device("cpu")), "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ae_train_step.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
