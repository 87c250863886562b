"""Batch cohort generation: seed partitioning, resume, manifests, and torch.distributed set-up (no Qt).

One subject per seed: ``<model>_seed<S>.nii.gz`` plus a JSON sidecar ``<model>_seed<S>.json`` that records the
provenance and the sha256 of the image file. The folder's ``cohort.csv`` (file, seed, model, sha256, seconds) is
built from the sidecars, so the shards of a job array, or the ranks of a ``torchrun`` job, only ever write their
own subjects and the manifest is merged at the end.

Reproducibility: the seeds are cut into *blocks* of ``batch_size`` consecutive seeds (in the order asked for)
and whole blocks are handed out (strided: block ``b`` goes to worker ``b % workers``). A seed is therefore
always denoised in the same batch, whatever the number of processes or shards, and a resumed block is
recomputed whole. That matters because a seed's chain does not depend on the other seeds of its batch, but its
floating-point rounding may depend on the batch *size*: on CPU, PyTorch runs some batch-1 3D convolutions with
its own im2col+GEMM kernel (``slow_conv3d``) and every larger batch with oneDNN, which sums in another order
(differences of a few float32 ulps, ~1e-6 on images in [0, 1]); cuDNN picks its algorithms per shape as well.
With blocks, the union of the shards equals the single-process run byte for byte (same device type, same
thread count on CPU: oneDNN's batched kernels round differently with 1 and 2 threads).

Files are never partial under their final names: the image is written to a temporary file and renamed
(`napari_meddiff.io.volume.write_volume`), then its sidecar (same way), so an image without a valid sidecar is
simply regenerated. A subject is valid when the image and its sidecar exist and the image's sha256 matches the
sidecar's.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import check_csv_is_ours, image_stem, write_text_atomic
from napari_meddiff.models import sha256_file

MANIFEST_NAME = "cohort.csv"


MANIFEST_COLUMNS = ("file", "seed", "model", "sha256", "seconds", "conditions", "label_map_sha256")
EARLIER_MANIFEST_COLUMNS = MANIFEST_COLUMNS[:-1]  # before label maps: still ours, rebuilt with the new column


#: sidecar fields that must match for an existing subject to count as part of the same cohort
SETTINGS_KEYS = ("model_sha256", "sampler", "steps", "eta", "precision", "label_map_sha256")


SIDECAR_RE = re.compile(r"^(?P<model>.+)_seed(?P<seed>-?\d+)\.json$")


STALE_MANIFEST_TEMP_SECONDS = 3600


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n`` (SLURM: ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise MeddiffError(f"--shard must look like i/n (e.g. 0/4), not {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise MeddiffError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0)")
    return index, count


def seed_blocks(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive blocks of ``batch_size`` seeds (the last may be shorter): the unit of work and of batching."""
    if batch_size < 1:
        raise MeddiffError("--batch-size must be at least 1")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise MeddiffError("seeds must be unique")
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]


def partition(
    seeds: Sequence[int], batch_size: int = 1, *, shard: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The blocks of seeds one worker generates: strided over blocks, first by shard, then by rank.

    With ``batch_size=1`` this is ``seeds[shard::n][rank::world]``. Every seed lands in exactly one worker's
    blocks, and always in the same block, so any split reproduces the single-process run exactly.
    """
    index, count = shard
    if not 0 <= rank < world:
        raise MeddiffError(f"rank {rank} is outside a world of {world}")
    return seed_blocks(seeds, batch_size)[index::count][rank::world]


def output_paths(out: Path, model_name: str, seed: int) -> tuple[Path, Path]:
    """``(image, sidecar)`` paths of one subject."""
    stem = f"{model_name}_seed{int(seed)}"
    return Path(out) / f"{stem}.nii.gz", Path(out) / f"{stem}.json"


def tissue_map_path(image: Path) -> Path:
    """Where a two-stage subject's tissue map lies: beside its image, ``<stem>_dseg.nii.gz`` (BIDS' suffix)."""
    return image.with_name(image_stem(image) + "_dseg.nii.gz")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, rename it into place."""
    write_text_atomic(Path(path), json.dumps(payload, indent=2) + "\n")


def remove_stray_temps(out: Path, model_name: str, seeds: Iterable[int]) -> list[Path]:
    """Delete temporary files left by a killed writer of these subjects (only ever hidden ``*.part*`` files).

    Only call it for seeds this process owns: another worker may be writing its own subjects right now.
    """
    removed = []
    wanted = {int(s) for s in seeds}
    pattern = re.compile(rf"^\.{re.escape(model_name)}_seed(-?\d+)(_dseg)?\.(nii\.gz|json)\..*part")
    for path in Path(out).glob(".*"):
        match = pattern.match(path.name)
        if match and int(match.group(1)) in wanted and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclasses.dataclass
class SubjectStatus:
    seed: int
    image: Path
    sidecar: Path
    meta: dict | None = None
    problem: str | None = None  # None: valid

    @property
    def valid(self) -> bool:
        return self.problem is None


def check_subject(out: Path, model_name: str, seed: int, *, check_hash: bool = True) -> SubjectStatus:
    """Is this subject complete: image and sidecar present, image readable, its sha256 the sidecar's?"""
    image, sidecar = output_paths(out, model_name, seed)
    status = SubjectStatus(int(seed), image, sidecar)
    if not image.is_file():
        status.problem = "missing" if not sidecar.exists() else "image missing"
        return status
    if not sidecar.is_file():
        status.problem = "image has no sidecar (interrupted write)"
        return status
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        status.problem = "unreadable sidecar"
        return status
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        status.problem = "sidecar has no sha256 (older format)"
        return status
    status.meta = meta
    if check_hash:
        try:
            digest = sha256_file(image)
        except OSError as exc:
            status.problem = f"unreadable image ({exc.strerror})"
            return status
        if digest != meta["sha256"]:
            status.problem = "sha256 does not match its sidecar (corrupt or changed)"
    return _with_tissue_map(status, check_hash)


def _with_tissue_map(status: SubjectStatus, check_hash: bool) -> SubjectStatus:
    """A two-stage subject is valid only with the tissue map its sidecar names, unchanged."""
    entry = (status.meta or {}).get("tissue_map_file")
    if status.problem is not None or entry is None:
        return status
    path = tissue_map_path(status.image)
    if entry != path.name or not path.is_file():
        status.problem = "its tissue map is missing"
    elif check_hash and sha256_file(path) != status.meta.get("tissue_map_sha256"):
        status.problem = "its tissue map's sha256 does not match the sidecar (corrupt or changed)"
    return status


def settings_mismatch(meta: dict, settings: dict) -> str | None:
    """A description of how an existing subject's settings differ from ``settings``; None if they agree."""
    diffs = []
    for key in SETTINGS_KEYS:
        if key not in settings:
            continue
        old, new = meta.get(key), settings[key]
        same = (old is not None and float(old) == float(new)) if key == "eta" else old == new
        if not same:
            diffs.append(f"{key}={_shown(old)} (now {_shown(new)})")
    return ", ".join(diffs) or None


def _shown(value):
    """A setting as a message shows it: a long string (a sha256) cut to its first 12 characters."""
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else value


def conditions_mismatch(model, meta: dict, wanted: dict | None, guidance_scale: float) -> str | None:
    """How an existing subject's conditions differ from those asked for; None if they agree (``model``: whose
    conditions they are; a two-stage run's map generator)."""
    if not model.conditions:
        return None
    want = model.condition_values(wanted)
    have = meta.get("conditions")
    if have != want:
        return f"conditions={have} (now {want})"
    if float(meta.get("guidance_scale", 1.0)) != float(guidance_scale):
        return f"guidance_scale={meta.get('guidance_scale')} (now {guidance_scale})"
    return None


@dataclasses.dataclass
class ManifestReport:
    rows: list[dict]
    problems: list[str]
    path: Path | None = None


def collect_rows(out: Path) -> ManifestReport:
    """Manifest rows for every valid subject in ``out`` (all models), and a line per problem found."""
    out = Path(out)
    rows: list[dict] = []
    problems: list[str] = []
    sidecar_images = set()
    settings: dict[str, dict[tuple, list[int]]] = {}
    for sidecar in sorted(out.glob("*.json")):
        match = SIDECAR_RE.match(sidecar.name)
        if not match or sidecar.name.startswith("."):
            continue
        model_name, seed = match.group("model"), int(match.group("seed"))
        image, _ = output_paths(out, model_name, seed)
        sidecar_images.update((image.name, tissue_map_path(image).name))
        status = check_subject(out, model_name, seed)
        if not status.valid:
            problems.append(f"{image.name}: {status.problem}; left out of {MANIFEST_NAME}")
            continue
        meta = status.meta
        key = tuple(meta.get(k) for k in SETTINGS_KEYS)
        settings.setdefault(meta.get("model", model_name), {}).setdefault(key, []).append(seed)
        rows.append(
            {
                "file": image.name,
                "seed": seed,
                "model": meta.get("model", model_name),
                "sha256": meta["sha256"],
                "seconds": meta.get("seconds", ""),
                "conditions": conditions_text(meta),
                "label_map_sha256": meta.get("label_map_sha256", ""),
            }
        )
    for image in sorted(out.glob("*_seed*.nii.gz")):
        if not image.name.startswith(".") and image.name not in sidecar_images:
            problems.append(f"{image.name}: image has no sidecar (interrupted write); left out of {MANIFEST_NAME}")
    for model_name, groups in settings.items():
        if len(groups) > 1:
            described = "; ".join(
                f"seeds {min(seeds)}..{max(seeds)} ({len(seeds)}): "
                + ", ".join(f"{k}={v}" for k, v in zip(SETTINGS_KEYS, key) if k != "model_sha256")
                + f", weights {str(key[0])[:12]}"
                for key, seeds in groups.items()
            )
            problems.append(f"{model_name}: subjects generated with different settings (all listed): {described}")
    rows.sort(key=lambda r: (r["model"], r["seed"]))
    return ManifestReport(rows, problems)


def conditions_text(meta: dict) -> str:
    """A subject's conditions for the manifest: ``"age=0.7 gender=1"`` (and ``guidance=S`` when guided)."""
    values = meta.get("conditions") or {}
    parts = [f"{k}={v:g}" for k, v in values.items() if isinstance(v, (int, float))]
    scale = meta.get("guidance_scale")
    if isinstance(scale, (int, float)) and scale != 1:
        parts.append(f"guidance={scale:g}")
    return " ".join(parts)


def manifest_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in MANIFEST_COLUMNS})
    return buf.getvalue()


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_manifest_is_ours(out: Path) -> None:
    """Refuse a folder whose ``cohort.csv`` is another file (a training cohort's subject list, written by
    ``meddiff cohort``, has the same name): rebuilding it from generate's sidecars would lose it."""
    check_csv_is_ours(
        Path(out) / MANIFEST_NAME, [MANIFEST_COLUMNS, EARLIER_MANIFEST_COLUMNS], ours="a manifest of generated volumes",
        theirs="a training cohort from `meddiff cohort`", advice="generate into another folder",
    )  # fmt: skip


def write_manifest(out: Path) -> ManifestReport:
    """(Re)build ``out/cohort.csv`` from the sidecars, atomically; problems are reported, not written.

    Refused (nothing written) where ``cohort.csv`` is another kind of file, or where the folder holds no
    generated volume at all."""
    out = Path(out)
    check_manifest_is_ours(out)
    now = time.time()
    for tmp in out.glob(f".{MANIFEST_NAME}.*.part"):  # left by a killed writer long ago
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_MANIFEST_TEMP_SECONDS:
                tmp.unlink()
    report = collect_rows(out)
    if not report.rows and not report.problems:
        raise MeddiffError(f"{out} holds no generated volumes (no <model>_seed<S>.json sidecars): no manifest written")
    report.path = out / MANIFEST_NAME
    write_text_atomic(report.path, manifest_text(report.rows))
    return report


def all_sidecars_present(out: Path, model_name: str, seeds: Iterable[int]) -> bool:
    """Cheap check (no hashing) that every subject has an image and a sidecar: is the cohort finished?"""
    for seed in seeds:
        image, sidecar = output_paths(out, model_name, seed)
        if not (image.is_file() and sidecar.is_file()):
            return False
    return True


@dataclasses.dataclass
class GenerationReport:
    written: list[int] = dataclasses.field(default_factory=list)
    skipped: list[int] = dataclasses.field(default_factory=list)
    recomputed: list[int] = dataclasses.field(default_factory=list)  # valid, computed again to keep a block whole
    removed_temps: list[Path] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def generate_subjects(
    model,
    blocks: Sequence[Sequence[int]],
    out: Path,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    precision: str | None = None,
    device="cpu",
    overwrite: bool = False,
    extra: dict | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    on_plan: Callable[[int, int], None] | None = None,
    on_written: Callable[[Path], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    conditions: Callable[[int], dict] | None = None,
    guidance_scale: float | None = None,
    release_unet: bool = False,
    labels=None,
) -> GenerationReport:
    """Generate the subjects of ``blocks`` (this worker's share) into ``out``, skipping valid ones.

    A block with any subject to (re)generate is computed whole, in one batch, and only the subjects that need
    it are written: each seed keeps the batch it has in a full run. ``extra`` is added to every sidecar.
    ``on_plan(samples, steps)`` is called once the work is known (samples to compute, steps per chain);
    ``on_step(n)`` after each denoising step with the number of samples that advanced.
    ``conditions(seed)``: the model's conditions for a seed (a cohort may sweep one); recorded in the sidecars, as
    is ``guidance_scale`` (None: the default of the model whose conditions they are).
    ``release_unet``: free the model's UNet before the last block's decoding (`generate`'s option).
    ``labels``: the label map (a `Volume`) every subject is generated from (a label-map model); its digest is
    recorded, and a subject made from another map is an error, not overwritten.
    """
    import torch

    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.tasks.settings import resolve_settings
    from napari_meddiff.tasks.two_stage import conditions_model, map_chain_steps

    out = Path(out)
    report = GenerationReport()
    t0 = time.perf_counter()
    resolved = resolve_settings(
        model, "generate", torch.device(device), sampler=sampler, steps=steps, eta=eta, precision=precision
    )
    settings = {"model_sha256": model.weights_sha256, **resolved}
    if labels is not None:
        from napari_meddiff.tasks.from_labels import checked_label_map

        settings["label_map_sha256"] = checked_label_map(model, labels)[1]
    report.removed_temps = remove_stray_temps(out, model.name, [s for b in blocks for s in b])
    for path in report.removed_temps:
        log(f"removed stray temporary file {path}")
    conditioned = conditions_model(model, labels)  # a two-stage run's conditions are its map generator's
    if guidance_scale is None:  # as the conditions: the model's, or its map generator's
        guidance_scale = conditioned.guidance_default
    wanted = (conditioned, lambda seed: conditions(seed) if conditions else None, guidance_scale)
    plan = _blocks_to_compute(model, blocks, out, settings, wanted, overwrite=overwrite, report=report, log=log)
    if on_plan is not None:
        on_plan(sum(len(block) for block, _ in plan), settings["steps"] + map_chain_steps(conditioned, model))
    for i, (block, needed) in enumerate(plan):
        volumes = generate(
            model, block, sampler=settings["sampler"], steps=settings["steps"], device=str(device),
            precision=settings["precision"], batch_size=len(block), eta=eta,
            conditions=[conditions(s) for s in block] if conditions else None, guidance_scale=guidance_scale,
            on_step=_samples_advanced(on_step, len(block)) if on_step else None,
            release_unet=release_unet and i == len(plan) - 1, labels=labels,
        )  # fmt: skip
        _write_needed(model, volumes, needed, out, overwrite=overwrite, extra=extra, report=report,
                      on_written=on_written)  # fmt: skip
    report.seconds = time.perf_counter() - t0
    return report


def _write_tissue_map(vol, image_path: Path, replace: bool, description: str) -> dict:
    """A two-stage scan's map, written beside it (first: an image with a sidecar then has its map); its
    sidecar entries."""
    from napari_meddiff.io.volume import write_volume

    tissue_map = vol.metadata.get("tissue_map")
    if tissue_map is None:
        return {}
    path = tissue_map_path(image_path)
    write_volume(tissue_map, path, kind="labels", overwrite=replace or path.exists(), description=description)
    return {"tissue_map_file": path.name, "tissue_map_sha256": sha256_file(path)}


def _samples_advanced(on_step: Callable[[int], None], samples: int) -> Callable[[object], None]:
    """A step hook telling ``on_step`` how many samples advanced by one step."""
    return lambda info: on_step(samples)


def _blocks_to_compute(
    model, blocks, out: Path, settings: dict, wanted, *, overwrite: bool, report: GenerationReport, log
) -> list[tuple[list[int], set[int]]]:
    """The blocks with a subject to (re)generate, each with the seeds that need it; valid subjects are skipped
    (recorded in ``report``), and one made with other settings or conditions is an error, not overwritten.
    ``wanted``: (the model whose conditions they are, each seed's conditions, guidance scale)."""
    conditioned, conditions_of, guidance_scale = wanted
    plan: list[tuple[list[int], set[int]]] = []
    for block in blocks:
        needed = set()
        for seed in block:
            if overwrite:
                needed.add(int(seed))
                continue
            status = check_subject(out, model.name, seed)
            if not status.valid:
                if status.problem != "missing":
                    log(f"{status.image}: {status.problem}; regenerating")
                needed.add(int(seed))
                continue
            mismatch = settings_mismatch(status.meta, settings) or conditions_mismatch(
                conditioned, status.meta, conditions_of(seed), guidance_scale
            )
            if mismatch:
                raise MeddiffError(
                    f"{status.image} was generated with other settings: {mismatch}; "
                    "use --overwrite to replace it, or another --out"
                )
            log(f"{status.image} exists, skipping (use --overwrite to replace)")
            report.skipped.append(int(seed))
        if needed:
            plan.append(([int(s) for s in block], needed))
    return plan


def _write_needed(
    model, volumes, needed: set[int], out: Path, *, overwrite: bool, extra: dict | None, report, on_written
) -> None:
    """Write the volumes whose seeds needed it (image, then its sidecar); the others were computed only to keep
    their block whole (``report.recomputed``)."""
    import torch

    from napari_meddiff.io.volume import write_volume

    host = socket.gethostname()
    for vol in volumes:
        prov = vol.metadata["provenance"]
        seed = int(prov["seed"])
        if seed not in needed:
            report.recomputed.append(seed)
            continue
        image_path, sidecar = output_paths(out, model.name, seed)
        replace = overwrite or image_path.exists() or sidecar.exists()
        beside = _write_tissue_map(vol, image_path, replace, f"meddiff {model.name} seed {seed} tissue map")
        kind = "labels" if model.label_output else "image"  # a map generator's own volumes are label maps
        write_volume(vol, image_path, kind=kind, overwrite=replace, description=f"meddiff {model.name} seed {seed}")
        sidecar_payload = {
            "file": image_path.name,
            "sha256": sha256_file(image_path),
            **beside,
            "voxel_size_mm": list(model.voxel_size),
            **prov,
            "num_threads": torch.get_num_threads(),
            "host": host,
            **(extra or {}),
        }
        write_json_atomic(sidecar, sidecar_payload)
        report.written.append(seed)
        if on_written is not None:
            on_written(image_path)
