"""``meddiff models``: list the models on the search path."""

from __future__ import annotations

import argparse

from ..zoo import available_models, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list available models", description="List shipped and user models.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "DIMS", "SHAPE", "VOXEL (mm)", "PARAMS", "PATH")]
    for name, path in available_models().items():
        model = load_model(path)
        rows.append(
            (
                name,
                model.kind,
                f"{model.spatial_dims}D",
                "x".join(str(s) for s in model.image_shape),
                "x".join(f"{v:g}" for v in model.voxel_size),
                f"{model.num_parameters() / 1e6:.2f}M",
                str(path),
            )
        )
    if len(rows) == 1:
        print("no models found (set MEDDIFF_MODELS to a folder of model folders)")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
