"""``meddiff review``: set up a blinded reader study (``create``) and analyse it with its key (``summary``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_meddiff.cli.options import counted
from napari_meddiff.errors import MeddiffError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review",
        help="blinded reader study (visual Turing test): create, summary",
        description="A blinded real-vs-synthetic reader study; readers answer in the napari 'Reader study' widget.",
    )
    rsub = p.add_subparsers(dest="review_command", metavar="{create,summary}", required=True)
    c = rsub.add_parser(
        "create",
        help="make real and synthetic scans alike under random ids in a new study folder; key kept apart",
        description="Resample every case onto one grid (the synthetic scans' grid, or --grid), show all on the "
        "field of view every case covers, normalise their intensities to [0, 1] by one rule and store all alike "
        "(uint8, identical headers), under random ids in a random order. Label maps, masks and further scans of "
        "a subject (e.g. a cohort's -lesionfree variants) are skipped. The key (case -> source) is written to "
        "--key, outside the study folder; the summary needs it.",
    )
    c.add_argument("--real", required=True, type=Path, help="folder of real scans")
    c.add_argument("--synthetic", required=True, type=Path, help="folder of synthetic scans")
    c.add_argument("--out", required=True, type=Path, help="new (or empty) study folder, given to readers")
    c.add_argument(
        "--key",
        required=True,
        type=Path,
        help="new file for the study key, outside the study folder (never overwritten)",
    )
    c.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="image whose grid every case is resampled onto (default: the synthetic scans' grid)",
    )
    c.add_argument("--num", type=int, default=None, help="cases per source (default: all)")
    c.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for drawing, order and ids (default: a fresh random one per study, kept in the key)",
    )
    s = rsub.add_parser(
        "summary",
        help="accuracy vs chance, realism by source and reader agreement (needs the key)",
        description="Print the key numbers and write KEY-summary.json, KEY-summary.csv and "
        "KEY-realism_by_source.png next to the key (never into the study folder).",
    )
    s.add_argument("study", type=Path, help="study folder")
    s.add_argument("--key", required=True, type=Path, help="the study key written by review create")
    p.set_defaults(func=run)


def _skipped(path: Path, reason: str) -> None:
    print(f"meddiff: skipping {path}: {reason}", file=sys.stderr)


def _print_field_of_view(key: Path) -> None:
    """Tell the organiser (not the readers) when the cases were cut to a smaller common field of view, and by
    which scans."""
    import json

    doc = json.loads(key.read_text(encoding="utf-8"))
    fov, shape = doc["field_of_view"], doc["grid"]["shape"]
    if fov["voxels"] == shape[0] * shape[1] * shape[2]:
        return
    fraction = fov["fraction_of_grid"]
    least = min(doc["cases"].values(), key=lambda c: (c["grid_coverage"], c["original"]))
    print(
        f"every case shows the field of view all cases cover: {fraction:.0%} of the grid, the rest is blank in "
        f"every case (least covered by {least['original']}, {least['grid_coverage']:.0%})"
    )


def run(args: argparse.Namespace) -> int:
    if args.review_command == "create":
        from napari_meddiff.review.study import create_study

        study = create_study(
            args.real,
            args.synthetic,
            args.out,
            key=args.key,
            num=args.num,
            seed=args.seed,
            grid=args.grid,
            on_skip=_skipped,
            on_case=lambda k, n: print(f"\rwriting case {k}/{n}", end="", flush=True),
        )
        print(f"\nstudy with {counted(len(study.cases), 'case')} written to {study.folder}")
        _print_field_of_view(args.key)
        print(
            f"key written to {args.key}: keep it from the readers; "
            f"the summary is `meddiff review summary {study.folder} --key {args.key}`"
        )
        return 0
    if args.review_command == "summary":
        from napari_meddiff.review.summary import format_summary, summarize, summary_paths

        print(format_summary(summarize(args.study, args.key)))
        print(f"wrote {', '.join(str(p) for p in summary_paths(args.key))}")
        return 0
    raise MeddiffError(f"unknown review command {args.review_command!r}")
