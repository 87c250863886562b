"""This package's model folders: ``model.json`` + ``*.safetensors`` + ``MODEL_CARD.md``; read, load, save.

Networks are built from the MONAI configs in ``model.json`` and weights are read from safetensors after
their sha256 has been checked: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import current_umask
from napari_meddiff.models.boundary import check_nesting, inside_folder, shorten
from napari_meddiff.models.digests import weight_digests
from napari_meddiff.models.model import build_loaded_network, network_roles, sha256_file
from napari_meddiff.models.schema import validate_config

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "model.json"


class FolderFormat:
    """A model folder written by this package (``save_model_folder``, training)."""

    name = "meddiff"

    def detect(self, folder: Path) -> bool:
        return (folder / CONFIG_NAME).is_file()

    def read_config(self, folder: Path) -> dict[str, Any]:
        where = str(folder / CONFIG_NAME)
        try:
            config = json.loads(inside_folder(folder, CONFIG_NAME, where).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MeddiffError(f"cannot read {where}: {exc}") from None
        except RecursionError:  # json's parser recurses: a file of 100,000 "[" stops it
            raise MeddiffError(f"{where}: nested too deeply; not a config meddiff reads") from None
        validate_config(check_nesting(config, where), where)
        for net_name in network_roles(config):
            _weight_path(folder, net_name, config["weights"][net_name]["file"])  # `meddiff models` reports it
        return config

    def load_networks(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.nn.Module]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        nets: dict[str, torch.nn.Module] = {}
        for net_name in network_roles(config):
            entry = config["weights"][net_name]
            weight_file = _weight_path(folder, net_name, entry["file"])  # again: the folder may have changed
            if not weight_file.is_file():
                raise MeddiffError(f"missing weight file {weight_file}")
            if not weight_file.name.endswith(".safetensors"):
                raise MeddiffError(f"{weight_file}: only .safetensors weights are loaded")
            if not isinstance(entry.get("sha256"), str):
                raise MeddiffError(f"{folder / CONFIG_NAME}: weights.{net_name} lacks 'sha256'")
            digest = weight_digests(weight_file)[1]
            if digest != entry["sha256"]:
                raise MeddiffError(
                    f"{weight_file} is corrupt or was changed: sha256 {digest[:12]}... != {entry['sha256'][:12]}... "
                    "in model.json; refusing to load it"
                )
            try:
                state = {k: v.float() for k, v in load_file(str(weight_file)).items()}
            except (SafetensorError, OSError) as exc:
                raise MeddiffError(f"cannot read {weight_file}: {exc}") from None
            try:
                net = build_loaded_network(net_name, config["networks"][net_name], state, str(folder / CONFIG_NAME))
            except (RuntimeError, KeyError) as exc:
                raise MeddiffError(f"{weight_file} does not fit the {net_name} config: {str(exc)[:200]}") from None
            nets[net_name] = net
        return nets


FORMAT = FolderFormat()


def _weight_path(folder: Path, net_name: str, name: str) -> Path:
    """The weight file ``model.json`` names for ``net_name``: inside the folder, symlinks followed."""
    return inside_folder(folder, name, f"{folder / CONFIG_NAME}: weights.{net_name}.file {shorten(name)!r}")


MODEL_FOLDER_FILES = ("model.json", "MODEL_CARD.md", "train.yaml")
MODEL_FOLDER_SUFFIXES = (".safetensors", ".png")


def foreign_files(folder: Path) -> list[str]:
    """Entries of ``folder`` that a model folder written by this package would not hold."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if not (p.is_file() and (p.name in MODEL_FOLDER_FILES or p.suffix in MODEL_FOLDER_SUFFIXES))
    )


def check_model_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a model folder target that would lose data: an existing path without ``overwrite``, a file,
    a folder that is not a model folder, or one holding files this package did not write."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise MeddiffError(f"{out_dir} exists and is not a folder; choose another output folder")
    if not overwrite:
        raise MeddiffError(
            f"{out_dir} exists; not overwriting (choose another folder, or --overwrite to replace "
            "an earlier model folder)"
        )
    if not (out_dir / "model.json").is_file():
        raise MeddiffError(f"{out_dir} exists and is not a model folder (no model.json); refusing to replace it")
    foreign = foreign_files(out_dir)
    if foreign:
        raise MeddiffError(
            f"{out_dir} holds files a model folder does not ({', '.join(foreign[:5])}); "
            "refusing to delete them: move them or choose another folder"
        )


def save_model_folder(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    networks: dict[str, torch.nn.Module],
    *,
    card: str,
    half: bool = False,
    extra_files: dict[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete model folder atomically: weights (safetensors, sha256 in model.json), config, card."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    check_model_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        os.chmod(
            tmp, 0o777 & ~current_umask()
        )  # mkdtemp makes 0700: a model folder follows the umask like every output
        config = copy.deepcopy(config)
        config["weights"] = {}
        for net_name, net in networks.items():
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            file_name = f"{net_name}.safetensors"
            save_file(state, str(tmp / file_name))
            os.chmod(tmp / file_name, 0o666 & ~current_umask())  # safetensors writes 0600: others could not read it
            config["weights"][net_name] = {
                "file": file_name,
                "sha256": sha256_file(tmp / file_name),
                "dtype": "float16" if half else "float32",
                "parameters": int(sum(v.numel() for v in state.values())),
            }
        (tmp / "model.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(card)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        old = None
        if out_dir.exists():
            check_model_target(out_dir, overwrite)  # again: it may have changed while the weights were written
            old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
            os.replace(out_dir, old)  # set aside, deleted only once the new folder is in place
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
