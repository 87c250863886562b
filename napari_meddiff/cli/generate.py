"""``meddiff generate``: sample synthetic volumes to NIfTI with a JSON sidecar each."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..devices import DEVICES, resolve_device
from ..errors import MeddiffError
from ..samplers import SAMPLERS
from ..sampling import PRECISIONS
from ..zoo import DEFAULT_MODEL, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate synthetic volumes", description="Generate synthetic scans as NIfTI.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--num", type=int, default=1, help="number of volumes (seeds S..S+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="fp32, or bf16 autocast (CPU/CUDA), fp16 (CUDA)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per network evaluation")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=run)


def output_paths(out: Path, model_name: str, seed: int) -> tuple[Path, Path]:
    stem = f"{model_name}_seed{seed}"
    return out / f"{stem}.nii.gz", out / f"{stem}.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..generate import generate
    from ..volume import write_volume

    if args.num < 1:
        raise MeddiffError("--num must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise MeddiffError(f"--steps must be a positive integer, got {args.steps}")
    device = resolve_device(args.device)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MeddiffError(f"cannot create output folder {args.out}: {exc.strerror}") from None
    if not os.access(args.out, os.W_OK):
        raise MeddiffError(f"output folder is not writable: {args.out}")
    model = load_model(args.model, device=device)
    seeds = list(range(args.seed, args.seed + args.num))
    todo = []
    for seed in seeds:
        image_path, _ = output_paths(args.out, model.name, seed)
        if image_path.exists() and not args.overwrite:
            print(f"{image_path} exists, skipping (use --overwrite to replace)", file=sys.stderr)
        else:
            todo.append(seed)
    if not todo:
        return 0
    from ..generate import default_sampling

    steps = args.steps or default_sampling(model)["steps"]
    bar = tqdm(total=len(todo) * steps, desc=f"{model.name}", unit="step", file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start : start + args.batch_size]
        volumes = generate(
            model, chunk, sampler=args.sampler, steps=args.steps, device=str(device), precision=args.precision,
            batch_size=args.batch_size, eta=args.eta, on_step=lambda info: bar.update(len(chunk)),
        )
        for vol in volumes:
            prov = vol.metadata["provenance"]
            image_path, sidecar = output_paths(args.out, model.name, prov["seed"])
            write_volume(vol, image_path, overwrite=args.overwrite, description=f"meddiff {model.name} seed {prov['seed']}")
            write_json_atomic(sidecar, {"file": image_path.name, "voxel_size_mm": list(model.voxel_size), **prov})
            tqdm.write(str(image_path), file=sys.stdout)
    bar.close()
    return 0
