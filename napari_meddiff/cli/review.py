"""``meddiff review``: set up a blinded reader study (``create``) and analyse it (``summary``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MeddiffError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review",
        help="blinded reader study (visual Turing test): create, summary",
        description="A blinded real-vs-synthetic reader study; readers answer in the napari 'Reader study' widget.",
    )
    rsub = p.add_subparsers(dest="review_command", metavar="{create,summary}", required=True)
    c = rsub.add_parser(
        "create",
        help="copy real and synthetic scans under neutral ids into a new study folder",
        description="Draw cases from both folders, shuffle them with the seed and write them (float32 NIfTI, "
        "headers scrubbed) under neutral ids; the key goes to STUDY/key.json, which readers must not open.",
    )
    c.add_argument("--real", required=True, type=Path, help="folder of real scans")
    c.add_argument("--synthetic", required=True, type=Path, help="folder of synthetic scans")
    c.add_argument("--out", required=True, type=Path, help="new (or empty) study folder")
    c.add_argument("--num", type=int, default=None, help="cases per source (default: all)")
    c.add_argument("--seed", type=int, default=0, help="random seed for drawing, order and ids (default 0)")
    s = rsub.add_parser(
        "summary",
        help="accuracy vs chance, realism by source and reader agreement",
        description="Write STUDY/summary.json, summary.csv and realism_by_source.png and print the key numbers.",
    )
    s.add_argument("study", type=Path, help="study folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.review_command == "create":
        from ..review.study import create_study

        study = create_study(args.real, args.synthetic, args.out, num=args.num, seed=args.seed,
                             on_case=lambda k, n: print(f"\rwriting case {k}/{n}", end="", flush=True))
        print(f"\nstudy with {len(study.cases)} cases written to {study.folder}")
        print(f"the key is {study.folder / 'key.json'}: do not give it to readers")
        return 0
    if args.review_command == "summary":
        from ..review.summary import REALISM_PNG, SUMMARY_CSV, SUMMARY_JSON, format_summary, summarize

        summary = summarize(args.study)
        print(format_summary(summary))
        print(f"wrote {', '.join(str(args.study / n) for n in (SUMMARY_JSON, SUMMARY_CSV, REALISM_PNG))}")
        return 0
    raise MeddiffError(f"unknown review command {args.review_command!r}")
