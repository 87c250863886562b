"""A bundle's weight files: md5 (``large_files.yml``) and sha256 in one pass (remembered, `digests`), tensors only
(``torch.load(weights_only=True)``), the state dict found inside nested checkpoints, and MONAI Generative's old
key names converted by MONAI's own ``load_old_state_dict``."""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import shorten
from napari_meddiff.models.digests import weight_digests

if TYPE_CHECKING:
    import torch

#: checkpoint keys under which nested state dicts are looked for, per network
NESTED_KEYS = {
    "unet": (
        "unet_state_dict",
        "diffusion_state_dict",
        "diffusion",
        "unet",
        "model_state_dict",
        "state_dict",
        "model",
        "network",
        "net",
    ),
    "autoencoder": (
        "autoencoder_state_dict",
        "autoencoder",
        "vae",
        "model_state_dict",
        "state_dict",
        "model",
        "network",
        "net",
    ),
    "controlnet": ("controlnet_state_dict", "controlnet", "state_dict", "model"),
}


def file_digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, hashed now (for checking a download)."""
    from napari_meddiff.models.digests import hash_file

    return hash_file(path)


class WeightsWarning(UserWarning):
    """A weight file that loads but is not the file its bundle publishes (fine-tuned, or damaged)."""


def check_weight_file(path: Path, md5: str | None, folder: Path) -> tuple[str, str]:
    """The file's (sha256, md5), after checking it exists (``md5``: the published one, for the message).

    The md5 is not enforced here: MONAI checks it when it downloads, not when it loads, and a fine-tuned bundle
    differs from the published file (`meddiff fetch` checks strictly; the loader refuses a damaged file)."""
    if not path.is_file():
        expected = f" (md5 {md5})" if md5 else ""
        raise MeddiffError(
            f"missing weight file {path}{expected}: run `meddiff fetch {folder.name} --dir "
            f"{folder.parent}` with internet, or put the file there"
        )
    got_md5, sha = weight_digests(path)
    return sha, got_md5


def read_state_dict(path: Path, role: str) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only=True``), the state dict found inside a nested checkpoint if need be."""
    return state_dict_in(read_checkpoint(path), role, path)


def checkpoint_scale_factor(obj: Any) -> float | None:
    """A latent diffusion checkpoint's ``scale_factor`` (MAISI saves it beside ``unet_state_dict``), or None."""
    import torch

    value = obj.get("scale_factor") if isinstance(obj, dict) else None
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < 1e6:
        return float(value)
    return None


def read_checkpoint(path: Path) -> Any:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors and plain data, never pickled objects."""
    try:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            raise MeddiffError(_not_only_tensors(path, str(exc))) from None
        raise MeddiffError(f"cannot read {path} as PyTorch weights: {shorten(exc)}") from None
    return obj


def state_dict_in(obj: Any, role: str, path: Path) -> dict[str, torch.Tensor]:
    """The ``role`` network's state dict in a checkpoint ``obj`` read from ``path`` (``module.`` prefixes gone)."""
    state = _find_state_dict(obj, role)
    if state is None:
        found = [shorten(k, 40) for k in list(obj)[:8]] if isinstance(obj, dict) else type(obj).__name__
        raise MeddiffError(f"{path}: no state dict of tensors found (top-level keys: {found})")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _not_only_tensors(path: Path, torch_message: str) -> str:
    """The refusal of a checkpoint holding pickled objects. Nothing of torch's message is repeated but the name
    of what it refused: its advice (re-run with ``weights_only=False``, allow-list the class) is, for a hostile
    file, exactly the attack."""
    refused = re.search(r"GLOBAL ([\w.]{1,100})", torch_message)
    what = f": {refused.group(1)}" if refused else ""
    return (
        f"refusing {path}: it holds something other than tensors (pickled Python objects{what}) and will not "
        "be loaded: meddiff never unpickles them"
    )


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, role: str, depth: int = 0) -> dict | None:
    if _is_state_dict(obj):
        return obj
    if not isinstance(obj, dict) or depth > 2:
        return None
    for key in NESTED_KEYS[role]:
        if key in obj:
            found = _find_state_dict(obj[key], role, depth + 1)
            if found is not None:
                return found
    candidates = [v for v in obj.values() if _is_state_dict(v)]
    return candidates[0] if len(candidates) == 1 else None


def load_network(
    role: str, net_config: dict[str, Any], state: dict[str, torch.Tensor], path: Path, where: str
) -> torch.nn.Module:
    """The ``role`` network of ``net_config`` holding the weights ``state`` read from ``path``: current MONAI key
    names load directly, MONAI Generative's are renamed by MONAI's ``load_old_state_dict``; every parameter must
    come from the file."""
    from napari_meddiff.models.model import build_loaded_network

    remaining = dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints its progress
            net = build_loaded_network(role, net_config, remaining, where, old_keys=True)
    except (RuntimeError, KeyError) as exc:
        raise MeddiffError(f"{path} does not fit the network its bundle config describes: {str(exc)[:200]}") from None
    expected = net.state_dict()
    if set(state) == set(expected):
        return net
    unused = [k for k in remaining if "proj_attn" not in k]  # proj_attn is dropped where include_fc is false
    consumed = len(state) - len(remaining)
    if unused or consumed < len(expected):
        raise MeddiffError(
            f"{path} does not fit the network its bundle config describes: "
            f"{len(expected) - consumed} parameters not in the file, unused keys {unused[:3]}"
        )
    return net
