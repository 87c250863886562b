"""``meddiff models``: list the models on the search path (this package's folders and MONAI bundles)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import available_models, count_parameters, describe_model
from napari_meddiff.models.boundary import shorten


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list available models",
        description="List shipped and user models (model folders and MONAI bundles), with their conditions. "
        "A folder that cannot be read is reported and the others are still listed.",
    )
    p.set_defaults(func=run)


def _parameters(config: dict) -> str:
    known = [w.get("parameters") for w in config["weights"].values()]
    if known and all(isinstance(n, int) for n in known):
        return f"{sum(known) / 1e6:.2f}M"
    try:
        return f"{count_parameters(config) / 1e6:.2f}M"
    except MeddiffError:
        return "?"


MAX_LABELS_SHOWN = 8  # a longer vocabulary (MAISI's 133 labels) is listed in full under the table


def _conditions(model) -> str:
    """Named conditions with their ranges, and a label-map model's labels (``labels{0:background,...}``; the
    first few and their count when there are many)."""
    parts = [f"{c.name}[{c.low:g},{c.high:g}]" for c in model.conditions]
    for word, names in (("labels", model.label_map), ("draws", model.label_output)):
        labels = [f"{k}:{v}" for k, v in names.items()]
        if len(labels) > MAX_LABELS_SHOWN:
            labels = [*labels[: MAX_LABELS_SHOWN - 2], f"... {len(labels)} labels, listed below"]
        if labels:
            parts.append(word + "{" + ",".join(labels) + "}")
    return " ".join(parts) or "-"


def _label_notes(name: str, model) -> list[str]:
    """A long label vocabulary in full, wrapped, under the table."""
    import textwrap

    if len(model.label_map) <= MAX_LABELS_SHOWN:
        return []
    nbsp = "\u00a0"  # keeps each "value name" on one line
    text = ", ".join(f"{k} {v}".replace(" ", nbsp) for k, v in model.label_map.items())
    lines = [line.replace(nbsp, " ") for line in textwrap.wrap(text, 110)]
    return [f"{name}: {len(model.label_map)} labels:"] + [f"  {line}" for line in lines]


def _describe(name: str, path: Path) -> tuple[tuple[str, ...], list[str]]:
    """One folder's row of the listing, and its geometry notes."""
    model = describe_model(path)
    row = (
        name,
        model.kind,
        f"{model.spatial_dims}D",
        "x".join(str(s) for s in model.image_shape),
        "x".join(f"{v:g}" for v in model.voxel_size),
        _parameters(model.config),
        model.format,
        _conditions(model),
        str(path),
    )
    notes = []
    if model.geometry_notes:
        notes.append(f"{name}: geometry not all stated by the model's files (override in {path}/meddiff.json):")
        notes += [f"  - {note}" for note in model.geometry_notes]
    if model.map_generator:
        notes += [
            f"{name}: without --labels, {model.map_generator} draws each map (two stages)",
            f"  --condition sets {model.map_generator}'s conditions; the map is written beside the scan as _dseg",
        ]
    return row, notes + _label_notes(name, model)


def run(args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "DIMS", "SHAPE", "VOXEL (mm)", "PARAMS", "FORMAT", "CONDITIONS", "PATH")]
    notes: list[str] = []
    broken: list[str] = []
    for name, path in available_models().items():
        try:
            row, row_notes = _describe(name, path)
        except MeddiffError as exc:
            broken.append(f"{path}: not listed, it cannot be read: {exc}")
            continue
        except Exception as exc:  # whatever one folder holds, the others are still listed
            reason = shorten(" ".join(str(exc).split()))
            broken.append(f"{path}: not listed, unexpected {type(exc).__name__}: {reason} (please report it)")
            continue
        rows.append(row)
        notes += row_notes
    if len(rows) == 1 and not broken:
        print("no models found (set MEDDIFF_MODELS to a folder of model folders or MONAI bundles)")
        return 0
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for note in notes:
        print(f"NOTE: {note}" if not note.startswith("  ") else note)
    for problem in broken:
        print(f"meddiff: warning: {problem}", file=sys.stderr)
    return 0
