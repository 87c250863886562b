"""Folder-of-NIfTI datasets, preloaded to memory: canonical (RAS) orientation, resampled to the model's
voxel size, normalised to [0, 1] (the model's intensity spec), centred and cropped/padded to
``image_shape``; 2D models get axial slices through the brain. Labels (segmentation) follow the same
geometry with nearest-neighbour resampling."""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.intensity import intensity_window, normalise
from napari_meddiff.io.volume import read_volume, resample, to_canonical
from napari_meddiff.training.conditions import measure_subject
from napari_meddiff.training.config import DEFAULT_VAL_SUBJECTS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Dataset:
    """Preprocessed training data in memory."""

    images: torch.Tensor  # (N, 1, *image_shape) float32 in [0, 1]
    labels: torch.Tensor | None  # (N, *image_shape) int64, or None
    subjects: list[str]  # subject id per item (a 2D item is a slice of that subject)
    files: list[str]  # source image files (one per subject)
    seeds: list[int]  # cohort seeds when known (cohort.csv), else []
    measures: torch.Tensor | None = None  # (N, K) conditioning measures in ml per item (conditional models)

    def __len__(self) -> int:
        return self.images.shape[0]


def needs_labels(cfg: dict[str, Any]) -> bool:
    """Does the model train on label maps (a segmentation model's target, a label-map model's condition)?"""
    return cfg["kind"] == "segmentation" or cfg.get("label_map") is not None or cfg.get("label_output") is not None


def label_count(cfg: dict[str, Any]) -> int:
    """How many label values the model knows (segmentation classes, or a label-map model's labels)."""
    if cfg["kind"] == "segmentation":
        return int(cfg["segmentation"]["num_classes"])
    return len((cfg.get("label_map") or cfg["label_output"])["labels"])


def list_subjects(data_cfg: dict[str, Any], with_labels: bool) -> list[tuple[Path, Path | None]]:
    folder = Path(data_cfg["dir"])
    if not folder.is_dir():
        raise MeddiffError(f"training data folder {folder} does not exist")
    files = sorted(folder.glob(data_cfg["images"]))
    if not files:
        raise MeddiffError(f"no files match {data_cfg['images']!r} in {folder}")
    if data_cfg.get("max_subjects"):
        files = files[: int(data_cfg["max_subjects"])]
    pairs: list[tuple[Path, Path | None]] = []
    for f in files:
        label = None
        if with_labels:
            old, new = data_cfg["labels_replace"]
            label = f.with_name(f.name.replace(old, new))
            if label == f or not label.is_file():
                raise MeddiffError(f"no label file {label.name} for {f.name}")
        pairs.append((f, label))
    return pairs


def cohort_seeds(folder: Path, files: Sequence[Path]) -> list[int]:
    """Seeds of the subjects used, from the cohort's ``cohort.csv`` or from ``sub-<seed>`` names."""
    seeds: list[int] = []
    table = folder / "cohort.csv"
    by_name: dict[str, int] = {}
    if table.is_file():
        with open(table) as f:
            for row in csv.DictReader(f):
                if "seed" in row:
                    for key in ("subject", "subject_id", "participant_id", "image", "t1w"):
                        if row.get(key):
                            by_name[Path(row[key]).name.split("_")[0]] = int(row["seed"])
    for f in files:
        sub = f.name.split("_")[0]
        if sub in by_name:
            seeds.append(by_name[sub])
        else:
            m = re.match(r"sub-0*(\d+)$", sub)
            if m is None:
                return []
            seeds.append(int(m.group(1)))
    return seeds


def _fit(array: np.ndarray, shape: Sequence[int], centre: Sequence[float], fill: float = 0.0) -> np.ndarray:
    """Crop/pad ``array`` to ``shape`` around ``centre`` (voxel coordinates)."""
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    src, dst = [], []
    for n, s, c in zip(array.shape, shape, centre):
        start = int(round(c - s / 2))
        a0, a1 = max(start, 0), min(start + s, n)
        src.append(slice(a0, a1))
        dst.append(slice(a0 - start, a1 - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def foreground_centre(foreground: np.ndarray) -> np.ndarray:
    """Voxel coordinates of the centre of the foreground's bounding box (of the array without foreground)."""
    idx = np.argwhere(foreground)
    return (idx.min(0) + idx.max(0)) / 2 if len(idx) else (np.array(foreground.shape) - 1) / 2


def preprocess_subject(
    image_path: Path,
    label_path: Path | None,
    spatial_dims: int,
    image_shape: Sequence[int],
    voxel_size: Sequence[float],
    intensity: dict[str, Any],
    data_cfg: dict[str, Any],
    context_slices: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One subject -> (images, labels): (D, *image_shape) slices for 2D or (1, *image_shape) for 3D; with
    ``context_slices`` c (2D), (D, 2c + 1, *image_shape): each slice with its c neighbours on either side
    (zeros beyond the volume), the slice itself in the middle."""
    if spatial_dims == 3:
        spacing = tuple(voxel_size)
    else:
        thick = data_cfg.get("slice_thickness") or voxel_size[0]
        spacing = [float(v) for v in voxel_size]
        spacing.insert(int(data_cfg["slice_axis"]), float(thick))
    arr, lab = _resampled(image_path, label_path, tuple(spacing), intensity)
    if lab is not None and data_cfg.get("lesion_replace"):
        lab = _with_lesion(lab, image_path, tuple(spacing), data_cfg)
    fg = arr > float(data_cfg.get("foreground_threshold", 0.1))  # image foreground (labels may be lesions only)
    centre = foreground_centre(fg)
    if spatial_dims == 3:
        out = _fit(arr, image_shape, centre + 0.5)[None]
        lab_out = None if lab is None else _fit(lab, image_shape, centre + 0.5)[None]
        return out, lab_out
    return _brain_slices(arr, lab, fg, centre, image_shape, data_cfg, context_slices)


def _resampled(
    image_path: Path, label_path: Path | None, spacing: tuple[float, ...], intensity: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image (RAS, resampled to ``spacing``, intensities normalised) and its labels on the same grid."""
    img = resample(to_canonical(read_volume(image_path)), spacing)
    arr = np.asarray(img.array, np.float32)
    window = intensity_window(arr, intensity)
    arr = normalise(arr, window)
    lab = None
    if label_path is not None:
        lvol = to_canonical(read_volume(label_path))
        lab = np.rint(np.asarray(resample(lvol, spacing, labels=True).array)).astype(np.int64)
        if lab.shape != arr.shape:
            raise MeddiffError(f"{label_path.name} does not match the grid of {image_path.name}")
    return arr, lab


def _with_lesion(lab: np.ndarray, image_path: Path, spacing: tuple[float, ...], data_cfg: dict[str, Any]) -> np.ndarray:
    """The label map with the subject's lesion mask (where it has one) painted in as ``data.lesion_label``."""
    old, new = data_cfg["lesion_replace"]
    path = image_path.with_name(image_path.name.replace(old, new))
    if path == image_path or not path.is_file():
        return lab
    mask = resample(to_canonical(read_volume(path)), spacing, labels=True).array
    if mask.shape != lab.shape:
        raise MeddiffError(f"{path.name} does not match the grid of {image_path.name}")
    lab = lab.copy()
    lab[np.asarray(mask) > 0.5] = int(data_cfg["lesion_label"])
    return lab


def _brain_slices(
    arr: np.ndarray,
    lab: np.ndarray | None,
    fg: np.ndarray,
    centre: np.ndarray,
    image_shape: Sequence[int],
    data_cfg: dict[str, Any],
    context_slices: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The slices along ``data_cfg['slice_axis']`` with enough foreground, each fitted to ``image_shape`` around
    the foreground centre (with its ``context_slices`` neighbours as channels), and their labels."""
    axis = int(data_cfg["slice_axis"])
    arr = np.moveaxis(arr, axis, 0)
    fgm = np.moveaxis(fg, axis, 0)
    lab = None if lab is None else np.moveaxis(lab, axis, 0)
    c2 = np.delete(centre, axis) + 0.5
    frac = fgm.reshape(fgm.shape[0], -1).sum(1) / float(np.prod(image_shape))
    keep = np.nonzero(frac >= float(data_cfg["min_brain_fraction"]))[0]
    empty = np.zeros(tuple(image_shape), np.float32)

    def neighbours(k: int) -> np.ndarray:
        return np.stack(
            [
                _fit(arr[j], image_shape, c2) if 0 <= j < arr.shape[0] else empty
                for j in range(k - context_slices, k + context_slices + 1)
            ]
        )

    if context_slices:
        imgs = (
            np.stack([neighbours(k) for k in keep])
            if len(keep)
            else np.zeros((0, 2 * context_slices + 1, *image_shape), np.float32)
        )
    else:
        imgs = (
            np.stack([_fit(arr[k], image_shape, c2) for k in keep])
            if len(keep)
            else np.zeros((0, *image_shape), np.float32)
        )
    if lab is None:
        return imgs, None
    labs = (
        np.stack([_fit(lab[k], image_shape, c2) for k in keep]) if len(keep) else np.zeros((0, *image_shape), np.int64)
    )
    return imgs, labs


def load_dataset(cfg: dict[str, Any], *, subjects: slice | None = None, progress: bool = True) -> Dataset:
    """Preprocess every subject of ``cfg['data']`` (optionally a slice of the subject list)."""
    pairs = list_subjects(cfg["data"], needs_labels(cfg))
    if subjects is not None:
        pairs = pairs[subjects]
    imgs, labs, subs, measures = [], [], [], []
    names = (cfg.get("conditioning") or {}).get("conditions")
    iterator = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="loading data", unit="subject", leave=False)
    for image_path, label_path in iterator:
        im, lb = preprocess_subject(
            image_path,
            label_path,
            cfg["spatial_dims"],
            cfg["image_shape"],
            cfg["voxel_size"],
            cfg["intensity"],
            cfg["data"],
            context_slices=int((cfg.get("segmentation") or {}).get("context_slices") or 0),
        )
        imgs.append(im)
        subs += [image_path.name.split("_")[0]] * len(im)
        if names:
            measures += [measure_subject(image_path, names)] * len(im)
        if lb is not None:
            labs.append(lb)
    images = torch.from_numpy(np.concatenate(imgs)).float()
    if images.ndim == int(cfg["spatial_dims"]) + 1:  # no channel axis yet
        images = images.unsqueeze(1)
    labels = torch.from_numpy(np.concatenate(labs)).long() if labs else None
    if images.shape[0] == 0:
        raise MeddiffError(
            f"no training items in {cfg['data']['dir']} (2D: no slice has min_brain_fraction "
            f"{cfg['data']['min_brain_fraction']} of foreground; lower it)"
        )
    num_classes = label_count(cfg) if labels is not None else 0
    if labels is not None and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise MeddiffError(
            f"labels go from {int(labels.min())} to {int(labels.max())} but the model knows {num_classes} "
            f"(0..{num_classes - 1}: {'label_map.labels' if cfg['kind'] != 'segmentation' else 'num_classes'})"
        )
    files = [str(p[0]) for p in pairs]
    seeds = cohort_seeds(Path(cfg["data"]["dir"]), [p[0] for p in pairs])
    return Dataset(images, labels, subs, files, seeds, torch.tensor(measures, dtype=torch.float32) if names else None)


def validation_subjects(data_cfg: dict[str, Any], num_subjects: int) -> tuple[int, str | None]:
    """How many of the ``num_subjects`` subjects are kept for validation, and a note when that is none because
    ``data.val_subjects`` was left out (its default needs more subjects). A number asked for that would leave
    no subject to train on is refused: never a silent run without the validation the config asks for."""
    asked = data_cfg.get("val_subjects")
    if asked is None:
        if num_subjects > DEFAULT_VAL_SUBJECTS:
            return DEFAULT_VAL_SUBJECTS, None
        return 0, (
            f"no validation subjects: data.val_subjects is not set and {num_subjects} subject(s) leave none for "
            f"the default {DEFAULT_VAL_SUBJECTS}; previews compare with training images, and no validation "
            "metrics are computed"
        )
    asked = int(asked)
    if asked and asked >= num_subjects:
        limit = f" (data.max_subjects {data_cfg['max_subjects']})" if data_cfg.get("max_subjects") else ""
        raise MeddiffError(
            f"data.val_subjects is {asked} but {data_cfg['dir']} gives {num_subjects} subject(s){limit} "
            f"matching {data_cfg['images']!r}: at least one must be left to train on; lower data.val_subjects "
            "(0: no validation subjects) or add subjects"
        )
    return asked, None


def split_dataset(cfg: dict[str, Any], progress: bool = True) -> tuple[Dataset, Dataset | None]:
    """(train, validation): the last ``data.val_subjects`` subjects (`validation_subjects`) are kept for
    previews/metrics."""
    pairs = list_subjects(cfg["data"], needs_labels(cfg))
    nval, _ = validation_subjects(cfg["data"], len(pairs))
    if nval:
        return (
            load_dataset(cfg, subjects=slice(0, len(pairs) - nval), progress=progress),
            load_dataset(cfg, subjects=slice(len(pairs) - nval, None), progress=progress),
        )
    return load_dataset(cfg, progress=progress), None


def random_batch(
    data: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    flip: bool,
    conditions: torch.Tensor | None = None,
):
    """A random batch (with replacement) with random left-right flips (axis 0 of the RAS grid): ``(x, labels)``,
    and the items' ``conditions`` as a third element when given (a flip keeps a volume's measures)."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
    x = data[idx].clone()
    y = None if labels is None else labels[idx].clone()
    if conditions is not None:
        return (*_flipped(x, y, batch_size, generator, flip), conditions[idx].clone())
    return _flipped(x, y, batch_size, generator, flip)


def _flipped(x: torch.Tensor, y: torch.Tensor | None, batch_size: int, generator: torch.Generator, flip: bool):
    if flip:
        f = torch.rand(batch_size, generator=generator) < 0.5
        if f.any():
            x[f] = x[f].flip(2)  # (B, C, X, ...): X = left-right
            if y is not None:
                y[f] = y[f].flip(1)
    return x, y


def random_crop(x: torch.Tensor, size: list[int] | None, gen: torch.Generator) -> torch.Tensor:
    """A random window of ``size`` from each item of ``(B, C, *S)``, drawn per item (a batch sees as many places
    as it has items); ``x`` when size is null."""
    if not size:
        return x
    windows = []
    for item in x:
        starts = [int(torch.randint(0, n - s + 1, (1,), generator=gen)) for n, s in zip(x.shape[2:], size)]
        windows.append(item[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(starts, size))])
    return torch.stack(windows)


def crop_schedule(tc: dict[str, Any], step: int) -> list[int] | None:
    """The crop size of ``step``: ``patch_size`` during the first ``patch_steps`` steps (all steps when
    that is null), whole images after (GroupNorm statistics of crops differ from whole images)."""
    patch = tc.get("patch_size")
    until = tc.get("patch_steps")
    return patch if patch and (until is None or step < int(until)) else None
