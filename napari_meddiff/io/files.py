"""Writing files safely: temporary file in the target folder, fsync, rename; permissions follow the umask;
an existing file is replaced only when asked; a full disk or a refused write is a `MeddiffError`."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from napari_meddiff.errors import MeddiffError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # what `io.volume.read_volume` opens


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``; another file: its
    ``Path.stem``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:  # longest first: .nii.gz before .nii
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error_message(exc: OSError, path: str | os.PathLike) -> str:
    """One line for an OSError while writing ``path`` (ENOSPC says the disk is full)."""
    import errno

    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: no space left on the device (nothing was replaced)"
    return f"cannot write {path}: {exc.strerror or exc}"


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse a target that is a folder, or an existing file without ``overwrite``."""
    if path.is_dir():
        raise MeddiffError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise MeddiffError(f"{path} exists; not overwriting (use --overwrite / overwrite=True)")


def ensure_folder(folder: Path) -> None:
    """Create ``folder`` (and parents) and check it can be written to."""
    if folder.exists() and not folder.is_dir():
        raise MeddiffError(f"{folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MeddiffError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise MeddiffError(f"output folder is not writable: {folder}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, suffix: str = ".part") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The file gets the permissions of a plain ``open()`` (0666 less the umask), not mkstemp's 0600, so a
    sidecar is as readable as the image it describes. On any failure the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    check_output_file(path, overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    ensure_folder(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError as exc:
        raise MeddiffError(os_error_message(exc, path)) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists() and not overwrite:  # appeared while we were writing
            raise MeddiffError(f"{path} appeared while writing; not overwriting")
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MeddiffError(os_error_message(exc, path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return Path(path)


def write_atomic(
    path: str | os.PathLike, writer: Callable[[Path], None], *, overwrite: bool = True, suffix: str = ".part"
) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """On failure inside the block, remove the folders of ``folder``'s path that did not exist before it
    and are still empty (a failed command leaves no empty output folder behind; a user's folder is kept)."""
    folder = Path(folder).absolute()
    new = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        yield
    except BaseException:
        for p in new:  # deepest first
            if p.is_dir() and not any(p.iterdir()):
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise


@contextlib.contextmanager
def new_files_removed_on_failure(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Outputs written as a set: on failure inside the block (a full disk at the third of five files), the ones
    of ``paths`` the block created are removed again, so a rerun is not refused for half a result. Files that
    existed before the block are left as they are."""
    paths = [Path(p) for p in paths]
    existed = {p for p in paths if p.exists()}
    try:
        yield
    except BaseException:
        for p in paths:
            if p not in existed:
                with contextlib.suppress(OSError):
                    p.unlink()
        raise


def check_csv_is_ours(path: Path, columns: Iterable[tuple[str, ...]], *, ours: str, theirs: str, advice: str) -> None:
    """Refuse to replace a CSV file at ``path`` whose header is none of ``columns`` (another tool's file of the
    same name, e.g. a training cohort's ``cohort.csv`` beside a manifest of generated volumes); no file: nothing
    to refuse. ``ours``/``theirs`` name the two kinds in the message, ``advice`` what to do instead."""
    path = Path(path)
    if not path.exists():
        return
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MeddiffError(f"{path} cannot be read ({exc}); it is left as it is: {advice}") from None
    if tuple(header) not in set(columns):
        raise MeddiffError(
            f"{path} is not {ours} (its columns: {', '.join(header[:6]) or 'none'}; {theirs}?); it is left as it "
            f"is: {advice}"
        )
