"""``meddiff generate``: sample synthetic volumes to NIfTI with a JSON sidecar each, and a ``cohort.csv``.

Runs alone, under ``torchrun`` (each rank takes its share of the seeds, on ``cuda:LOCAL_RANK`` with a GPU) or
as one shard of a job array (``--shard i/n``). Re-running skips subjects already written and valid. The logic
lives in `napari_meddiff.tasks.batch`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_meddiff.cli.conditions import add_condition_options, seed_conditions
from napari_meddiff.cli.options import add_sampling_options, counted, load_model_for, seed_value
from napari_meddiff.diffusion.seeds import seed_range
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import ensure_folder, image_stem, removed_if_left_empty
from napari_meddiff.models import DEFAULT_LABEL_MODEL, DEFAULT_MODEL, describe_model
from napari_meddiff.tasks import batch, distributed
from napari_meddiff.tasks.from_labels import require_label_map
from napari_meddiff.tasks.two_stage import conditions_model

EPILOG = """\
scaling out:
  torchrun --standalone --nproc_per_node 4 -m napari_meddiff.cli -- generate --num 1000 --out DIR
      one process per GPU (cuda:LOCAL_RANK) or CPU worker (gloo); rank 0 writes cohort.csv at the end
      (the `--` keeps torchrun from reading --num as its own --numa-binding)
  meddiff generate --num 1000 --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --out DIR
      one shard of a job array; cohort.csv is written by the shard that completes the cohort
  meddiff generate --merge-manifest DIR
      (re)build DIR/cohort.csv from the sidecars, checking every file's sha256
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate synthetic volumes",
        description="Generate synthetic scans as NIfTI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model name or folder (default {DEFAULT_MODEL}; with --labels, {DEFAULT_LABEL_MODEL})",
    )
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="MAP",
        help="a label map (NIfTI) to generate from, for a model that declares one (its values: `meddiff models`); "
        "each volume is written on the map's grid. A folder of maps: --num volumes for each, in OUT/<map name>/",
    )
    p.add_argument("--num", type=int, default=1, help="number of volumes (seeds S..S+N-1)")
    p.add_argument("--seed", type=seed_value, default=0, help="first seed")
    add_sampling_options(p, device_help="; cuda:LOCAL_RANK under torchrun")
    add_condition_options(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="samples per network evaluation (consecutive seeds are batched in fixed blocks, so a seed's file is the "
        "same however the run is split into processes or shards)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (required)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--shard", default=None, metavar="I/N", help="generate only shard I of N (0-based), for job arrays")
    p.add_argument(
        "--merge-manifest",
        type=Path,
        default=None,
        metavar="DIR",
        help="only (re)build DIR/cohort.csv from the sidecars in DIR, then exit",
    )
    p.set_defaults(func=run)


def merge(folder: Path) -> int:
    if not folder.is_dir():
        raise MeddiffError(f"not a folder: {folder}")
    report = batch.write_manifest(folder)
    for problem in report.problems:
        print(f"meddiff: warning: {problem}", file=sys.stderr)
    print(f"{report.path}: {counted(len(report.rows), 'subject')}", file=sys.stderr)
    return 1 if report.problems else 0


def run(args: argparse.Namespace) -> int:
    if args.merge_manifest is not None:
        if args.out is not None:
            raise MeddiffError("--merge-manifest takes the folder itself; do not combine it with --out")
        return merge(args.merge_manifest)
    if args.out is None:
        raise MeddiffError("--out is required (or --merge-manifest DIR)")
    if args.num < 1:
        raise MeddiffError("--num must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise MeddiffError(f"--steps must be a positive integer, got {args.steps}")
    if args.batch_size < 1:
        raise MeddiffError("--batch-size must be at least 1")
    if args.model is None:
        args.model = DEFAULT_LABEL_MODEL if args.labels is not None else DEFAULT_MODEL
    require_label_map(describe_model(args.model), args.labels, generator_may_draw=True)
    maps = _label_map_files(args.labels) if args.labels is not None else [None]
    shard = batch.parse_shard(args.shard) if args.shard is not None else (0, 1)
    ctx = distributed.DistContext.from_env()
    device = distributed.rank_device(args.device, ctx)
    seeds = seed_range(args.seed, args.num)
    conditioned = conditions_model(describe_model(args.model), args.labels)  # a two-stage run: the map generator's
    if args.guidance_scale is None:
        args.guidance_scale = conditioned.guidance_default
    args.conditions_for = seed_conditions(conditioned, args.condition, seeds, args.guidance_scale)
    blocks = batch.partition(seeds, args.batch_size, shard=shard, rank=ctx.rank, world=ctx.world)
    by_map = args.labels is not None and args.labels.is_dir()
    outs = [args.out / image_stem(path) for path in maps] if by_map else [args.out]
    for out in outs:
        batch.check_manifest_is_ours(out)  # before any work: a training cohort's list is never replaced
    with removed_if_left_empty(args.out):
        ensure_folder(args.out)
        for path, out in zip(maps, outs):
            label_map = _read_label_map(path) if path is not None else None
            each = argparse.Namespace(**{**vars(args), "out": out, "labels": path, "label_map": label_map})
            with removed_if_left_empty(out):
                ensure_folder(out)
                _generate(each, seeds, blocks, shard, ctx, device)
    return 0


def _label_map_files(path: Path) -> list[Path]:
    """--labels: the map itself, or every NIfTI file in the folder (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
        if not files:
            raise MeddiffError(f"--labels: the folder {path} holds no label maps (.nii or .nii.gz files)")
        return files
    if not path.is_file():
        raise MeddiffError(f"--labels: {path} is not a file or folder (a label map: NIfTI)")
    return [path]


def _read_label_map(path: Path):
    """A label map of --labels (a missing file was refused in one line, before any model was loaded)."""
    from napari_meddiff.io.volume import read_volume

    return read_volume(path)


def _generate(args: argparse.Namespace, seeds: list[int], blocks, shard, ctx, device) -> int:
    from tqdm import tqdm

    with distributed.distributed(ctx, device):
        model = load_model_for(args.model, device, args.precision, "generate")
        bar = None

        def on_plan(samples: int, steps: int) -> None:
            nonlocal bar
            if samples and ctx.is_main:
                bar = tqdm(total=samples * steps, desc=model.name, unit="step", file=sys.stderr, dynamic_ncols=True)

        where = []
        if shard != (0, 1):
            where.append(f"shard {shard[0]}/{shard[1]}")
        if ctx.distributed:
            where.append(f"rank {ctx.rank}/{ctx.world}")
        extra = {"shard": f"{shard[0]}/{shard[1]}", "rank": ctx.rank, "world_size": ctx.world}
        try:
            batch.generate_subjects(
                model,
                blocks,
                args.out,
                sampler=args.sampler,
                steps=args.steps,
                eta=args.eta,
                precision=args.precision,
                device=device,
                overwrite=args.overwrite,
                extra=extra,
                conditions=args.conditions_for,
                guidance_scale=args.guidance_scale,
                log=lambda msg: (tqdm.write if bar else print)(msg, file=sys.stderr),
                on_plan=on_plan,
                on_written=lambda path: tqdm.write(str(path), file=sys.stdout),
                on_step=(lambda n: bar.update(n) if bar else None),
                release_unet=True,  # this process samples no more after its last block: decode without it
                labels=args.label_map,
            )
        except Exception:
            distributed.all_ok(ctx, False)  # let the other ranks know, so none waits for us
            raise
        finally:
            if bar is not None:
                bar.close()
        if not distributed.all_ok(ctx, True):
            raise MeddiffError(
                f"rank {ctx.rank}: another rank failed (see its error); {batch.MANIFEST_NAME} not written"
            )
        if not ctx.is_main:
            return 0
        if batch.all_sidecars_present(args.out, model.name, seeds):
            report = batch.write_manifest(args.out)
            for problem in report.problems:
                print(f"meddiff: warning: {problem}", file=sys.stderr)
            print(f"{report.path}: {counted(len(report.rows), 'subject')}", file=sys.stderr)
        else:
            label = " ".join(where) or "this run"
            print(
                f"{label} done; {batch.MANIFEST_NAME} is written by the shard that completes the cohort "
                f"(or run: meddiff generate --merge-manifest {args.out})",
                file=sys.stderr,
            )
    return 0
