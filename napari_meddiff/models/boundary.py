"""Where data from outside enters a model: the files its configs name (they must resolve inside its folder), how
deeply its data files may nest, and user strings quoted back in messages (cut to a readable length).

A model folder is a boundary: a weight or config name in ``model.json``, ``meddiff.json`` or ``large_files.yml``
that leads out of the folder (``../../x.pt``, ``/etc/passwd``, a symlink to elsewhere) is refused before the file
is opened, so a downloaded folder can only make meddiff read its own files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError

SHOWN_CHARACTERS = 200
MAX_NESTING = 100  # a Zoo config nests 6 deep; recursive code (deepcopy, MONAI) then stays far from Python's limit


def shorten(text: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters, then an ellipsis and its full length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def inside_folder(folder: Path, name: Any, what: str) -> Path:
    """``folder / name``, after checking that it resolves (symlinks followed) to a path inside ``folder``.

    ``what`` names the entry in the error: ``"<file>: weights.unet.file 'x.pt'"``."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise MeddiffError(f"{what} must be the name of a file inside the model folder")
    path = folder / name
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        raise MeddiffError(f"{what} cannot be resolved: {shorten(exc)}") from None
    if root not in real.parents:
        raise MeddiffError(
            f"{what} resolves to {shorten(real)}, outside the model folder {shorten(folder)}; a model reads only "
            "files inside its own folder (copy the file in)"
        )
    return path


def check_nesting(data: Any, where: str, limit: int = MAX_NESTING) -> Any:
    """``data`` (parsed JSON or YAML) unchanged, after checking that its lists and objects nest at most ``limit``
    deep. Iterative: a file nested thousands deep is refused here, not by a RecursionError in whatever recursive
    code (deepcopy, reference resolution, MONAI) meets it later."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            raise MeddiffError(f"{where}: nested more than {limit} levels deep; not a config meddiff reads")
        stack.extend((child, depth + 1) for child in children)
    return data
