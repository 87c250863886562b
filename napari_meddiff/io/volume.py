"""`Volume`: voxels plus world geometry, read from and written to NIfTI (and what SimpleITK reads).

Conventions: arrays are indexed (i, j, k) like nibabel, and ``affine`` maps voxel indices to RAS+ world
millimetres, as in NIfTI. Everything that leaves the package inherits the affine of what came in.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import check_output_file, write_atomic

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass
class Volume:
    """A 2D or 3D image with its voxel-to-world (RAS mm) affine and free-form metadata."""

    array: np.ndarray
    affine: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise MeddiffError(f"affine must be 4x4, got {self.affine.shape}")
        if problem := affine_problem(self.affine):
            raise MeddiffError(f"the volume's affine (voxel to world) is not usable: {problem}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (length of each affine column)."""
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) for z in zooms[: max(self.array.ndim, 1)][:3])

    def with_array(self, array: np.ndarray, **metadata: Any) -> Volume:
        """A new volume on the same grid (same affine), metadata copied and updated."""
        if array.shape[:3] != self.array.shape[:3]:
            raise MeddiffError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.affine.copy(), {**self.metadata, **metadata})

    @classmethod
    def from_spacing(cls, array: np.ndarray, spacing: tuple[float, ...], **metadata: Any) -> Volume:
        """A volume in RAS+ orientation with the given voxel size, centred on the world origin."""
        spacing = tuple(float(s) for s in spacing) + (1.0,) * (3 - len(spacing))
        affine = np.diag([*spacing[:3], 1.0])
        shape = np.array(array.shape[:3] + (1,) * (3 - array.ndim), dtype=float)
        affine[:3, 3] = -(shape - 1) / 2 * np.array(spacing[:3])
        return cls(array, affine, dict(metadata))


MAX_VOXEL_MM = 1e4  # a voxel 10 m wide is a damaged header, not a scan
MIN_VOXEL_MM = 1e-6


def affine_problem(affine: np.ndarray) -> str | None:
    """What makes a voxel-to-world affine unusable (None when nothing): non-finite values, a voxel axis of zero
    or implausible length, or axes that do not span 3D."""
    if not np.isfinite(affine).all():
        return "it has NaN or infinite values"
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if sizes.min() < MIN_VOXEL_MM or sizes.max() > MAX_VOXEL_MM:
        shown = ", ".join(f"{s:g}" for s in sizes)
        return f"voxel sizes {shown} mm (each must be between {MIN_VOXEL_MM:g} and {MAX_VOXEL_MM:g} mm)"
    if abs(np.linalg.det(affine[:3, :3] / sizes)) < 1e-6:
        return "its voxel axes are parallel (a singular matrix)"
    return None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MeddiffError(f"file not found: {path}")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise MeddiffError(f"cannot read {path}: permission denied")
    if path.is_dir():
        return
    if path.stat().st_size == 0:
        raise MeddiffError(f"file is empty: {path}")
    if path.name.endswith(".gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise MeddiffError(f"{path} is named .gz but is not gzip-compressed (not a NIfTI file?)")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | os.PathLike, frame: int = 0) -> Volume:
    """Read a NIfTI file (or a file/DICOM folder SimpleITK reads) into a `Volume`.

    ``frame`` picks the volume of a true 4D file; a singleton 4th axis is squeezed.
    Scaling (``scl_slope``/``scl_inter``) is applied; integer files without scaling keep their dtype.
    """
    path = Path(path)
    _check_readable(path)
    if path.is_dir() or not _is_nifti(path):
        return _read_with_sitk(path, frame)
    try:
        img, data = _load_nifti(path)
        slope, inter = img.dataobj.slope, img.dataobj.inter
    except MeddiffError:
        raise
    except MemoryError:
        raise MeddiffError(f"cannot read {path}: its image does not fit in memory") from None
    except Exception as exc:  # whatever nibabel or gzip raise while parsing: the file is damaged
        raise MeddiffError(f"cannot read {path}: not a valid NIfTI file ({' '.join(str(exc).split())})") from None
    _check_header_values(img, data, slope, inter, path)
    header = img.header
    scaled = not (slope in (1, None) and inter in (0, None)) or np.issubdtype(data.dtype, np.floating)
    data = data.astype(np.float32) if scaled else np.asarray(data)
    data = _pick_frame(data, frame, path)
    data = np.ascontiguousarray(data.byteswap().view(data.dtype.newbyteorder()) if not data.dtype.isnative else data)
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    meta = {
        "source_path": str(path),
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "qform_code": int(qcode),
        "sform_code": int(scode),
        "qform": None if qform is None else np.asarray(qform).tolist(),
        "descrip": header["descrip"].tobytes().rstrip(b"\x00").decode("latin-1", "replace"),
        "xyzt_units": header.get_xyzt_units(),
        "original_dtype": str(img.get_data_dtype()),
        "is_label_like": bool(np.issubdtype(data.dtype, np.integer)),
    }
    return Volume(data, img.affine.copy(), meta)


def _load_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """The image and its voxels. A .gz file is decompressed whole first, so that its CRC and length are
    checked (nibabel reads only the bytes it needs: a damaged file's voxels would be read as data)."""
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise MeddiffError(f"{path} is not a NIfTI image")
    _check_data_size(img, path)
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise MeddiffError(f"cannot read {path}: damaged gzip data ({' '.join(str(exc).split())})") from None
        img = type(img).from_bytes(raw)
    return img, np.asanyarray(img.dataobj)


def _check_header_values(img: Any, data: np.ndarray, slope, inter, path: Path) -> None:
    """Refuse values a scan cannot have: complex voxels, non-finite scale factors, an unusable affine."""
    if np.iscomplexobj(data):
        raise MeddiffError(f"cannot read {path}: complex-valued voxels ({data.dtype}) are not an image; save the "
                           "magnitude (or real part) as its own file")  # fmt: skip
    for name, value in (("scl_slope", slope), ("scl_inter", inter)):
        if value is not None and not np.isfinite(value):
            raise MeddiffError(f"cannot read {path}: its header's {name} is {value} (damaged header?)")
    if problem := affine_problem(img.affine):
        raise MeddiffError(f"cannot read {path}: its affine (voxel to world) is not usable: {problem}")


def _check_data_size(img: Any, path: Path) -> None:
    """Refuse a header whose image cannot be in the file or in memory (before reading any voxel)."""
    from napari_meddiff.runtime.memory import available_ram_bytes

    shape = img.header.get_data_shape()
    if any(int(n) < 0 for n in shape):
        raise MeddiffError(f"cannot read {path}: header has a negative dimension {shape}")
    nbytes = int(np.prod([int(n) for n in shape], dtype=object)) * img.get_data_dtype().itemsize
    if not path.name.lower().endswith(".gz"):
        offset = int(img.header.get("vox_offset", 0) or 0)
        have = path.stat().st_size
        if offset + nbytes > have:
            raise MeddiffError(
                f"cannot read {path}: truncated or damaged (header says {shape} voxels, "
                f"{offset + nbytes:,} bytes; the file holds {have:,})"
            )
    need = nbytes * (4 // min(4, img.get_data_dtype().itemsize) + 1)  # file dtype + a float32 copy
    free = available_ram_bytes()
    if need > free:
        raise MeddiffError(
            f"cannot read {path}: header says {shape} voxels ({nbytes / 2**30:.1f} GiB), more than "
            f"the {free / 2**30:.1f} GiB of free memory (damaged header?)"
        )


def _pick_frame(data: np.ndarray, frame: int, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        n = data.shape[3]
        if not 0 <= frame < n:
            raise MeddiffError(f"{path} has {n} volumes; frame {frame} does not exist (choose 0..{n - 1})")
        warnings.warn(f"{path.name} is 4D with {n} volumes; using volume {frame}", stacklevel=3)
        data = data[..., frame]
    elif data.ndim > 4:
        raise MeddiffError(f"{path} has {data.ndim} dimensions; only 2D, 3D and 4D images are supported")
    return data


def _read_with_sitk(path: Path, frame: int) -> Volume:
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise MeddiffError(f"no DICOM series found in folder {path}")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise MeddiffError(f"cannot read {path}: {first}") from None
    vol = volume_from_sitk(image)
    vol.array = _pick_frame(vol.array, frame, path)
    vol.metadata.update(source_path=str(path), format="sitk")
    return vol


def volume_from_sitk(image: Any) -> Volume:
    """Convert a SimpleITK image (LPS world) into a RAS `Volume` with (i, j, k) array order."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise MeddiffError("multi-component (vector/RGB) images are not supported")
    arr = np.transpose(arr, tuple(range(dim))[::-1])
    direction = np.array(image.GetDirection()).reshape(dim, dim)[:3, :3]
    spacing = np.array(image.GetSpacing())[:3]
    origin = np.array(image.GetOrigin())[:3]
    n = min(dim, 3)
    lps = np.eye(4)
    lps[:n, :n] = direction[:n, :n] * spacing[:n]
    lps[:n, 3] = origin[:n]
    return Volume(np.ascontiguousarray(arr), LPS_TO_RAS @ lps, {})


def volume_to_sitk(vol: Volume) -> Any:
    """Convert a 3D `Volume` into a SimpleITK image in LPS world coordinates."""
    import SimpleITK as sitk

    if vol.array.ndim != 3:
        raise MeddiffError("only 3D volumes can be converted to SimpleITK images")
    lps = LPS_TO_RAS @ vol.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    # numpy makes the transposed copy with the GIL released; SimpleITK would make it holding the GIL (64 ms for a
    # 1 mm brain: a frozen viewer while a widget task prepares its input, issue 37)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.array, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    return image


def _output_dtype(array: np.ndarray, kind: str) -> np.dtype:
    if kind == "labels":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return np.dtype(dt)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def write_volume(
    vol: Volume,
    path: str | os.PathLike,
    *,
    kind: str = "image",
    overwrite: bool = False,
    description: str | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``vol`` as NIfTI (``.nii`` or ``.nii.gz``) with its affine, atomically.

    ``kind`` is ``"image"`` (float32) or ``"labels"`` (smallest fitting integer type). An existing file is
    never replaced unless ``overwrite``; the data go to a temporary file that is renamed into place. A volume
    with NaN/Inf voxels is refused (a diverged result must not pass for a scan) unless ``allow_nonfinite``
    (the user's own data, e.g. a napari layer).
    """
    path = Path(path)
    if not _is_nifti(path):
        raise MeddiffError(f"output must end in .nii or .nii.gz: {path}")
    if kind not in ("image", "labels"):
        raise MeddiffError(f"kind must be 'image' or 'labels', not {kind!r}")
    check_output_file(path, overwrite)
    array = np.asarray(vol.array)
    if not allow_nonfinite and array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise MeddiffError(
                f"not writing {path}: {bad} voxels are NaN or Inf (the computation diverged; "
                "check the sampler settings)"
            )
    if kind == "labels":
        array = np.rint(array)
    array = array.astype(_output_dtype(array, kind))
    fmt = vol.metadata.get("format", "nifti1")
    cls = nib.Nifti2Image if fmt == "nifti2" else nib.Nifti1Image
    img = cls(array, vol.affine)
    qcode = int(vol.metadata.get("qform_code") or 1)
    scode = int(vol.metadata.get("sform_code") or (2 if qcode == 1 else qcode))
    img.set_qform(vol.affine, code=qcode)
    img.set_sform(vol.affine, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    descrip = description if description is not None else vol.metadata.get("descrip", "")
    img.header["descrip"] = (descrip or "")[:79].encode("latin-1", "replace")
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    return write_atomic(path, lambda tmp: nib.save(img, tmp), overwrite=overwrite, suffix=f".part{suffix}")


# --- geometry helpers (resampling always through SimpleITK) ---------------------------------------


def to_canonical(vol: Volume) -> Volume:
    """Reorient to the closest RAS+ axis order (a permutation/flip of voxels, no interpolation)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.array), vol.affine))
    return Volume(np.asanyarray(img.dataobj), img.affine, dict(vol.metadata))


def resample(vol: Volume, spacing: tuple[float, float, float], *, labels: bool = False) -> Volume:
    """Resample a 3D volume to ``spacing`` (mm), same orientation and world extent (SimpleITK)."""
    import SimpleITK as sitk

    image = volume_to_sitk(Volume(np.asarray(vol.array, dtype=np.float32), vol.affine))
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(spacing, dtype=float)
    old_size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # keep the physical centre of the field of view fixed
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((old_size - 1) / 2).tolist()))
    origin = centre - direction @ (((new_size - 1) / 2) * new_spacing)
    out = sitk.Resample(
        image,
        [int(s) for s in new_size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        origin.tolist(),
        new_spacing.tolist(),
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    res = volume_from_sitk(out)
    res.metadata = dict(vol.metadata)
    return res


def resample_like(vol: Volume, reference: Volume, *, labels: bool = False, default: float = 0.0) -> Volume:
    """Resample ``vol`` onto the grid of ``reference`` (world coordinates kept; SimpleITK)."""
    import SimpleITK as sitk

    moving = volume_to_sitk(Volume(np.asarray(vol.array, dtype=np.float32), vol.affine))
    ref = volume_to_sitk(Volume(np.zeros(reference.shape[:3], np.float32), reference.affine))
    out = sitk.Resample(
        moving,
        ref,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        float(default),
        sitk.sitkFloat32,
    )
    arr = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    return Volume(np.ascontiguousarray(arr), reference.affine.copy(), dict(vol.metadata))


def world_extent_overlaps(a: Volume, b: Volume) -> bool:
    """True when the world bounding boxes of two 3D volumes intersect."""

    def box(v: Volume) -> tuple[np.ndarray, np.ndarray]:
        shape = np.array(v.shape[:3]) - 1
        corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])])
        world = (v.affine @ corners.T).T[:, :3]
        return world.min(0), world.max(0)

    (alo, ahi), (blo, bhi) = box(a), box(b)
    return bool(np.all(alo <= bhi + 1e-3) and np.all(blo <= ahi + 1e-3))
