"""A MONAI bundle config read as data, never run.

MONAI's `ConfigParser` evaluates ``$`` expressions and imports ``_target_`` classes (a bundle's ``scripts/``
among them). Here a config is only JSON/YAML: ``_target_`` dicts are matched against an allow-list of MONAI
network and scheduler classes, ``@id`` references (``#`` for nesting) are replaced by the literal values they
point at, and a value that would need Python (``$...``, ``%file#id`` macros, a ``_target_`` outside the list)
is an error naming its key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import check_nesting, inside_folder, shorten

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")

#: ``_target_`` -> (role, MONAI class name); MONAI Generative's old module paths map to MONAI's classes
_CLASSES = {
    "DiffusionModelUNet": "unet",
    "AutoencoderKL": "autoencoder",
    "DDPMScheduler": "scheduler",
    "DDIMScheduler": "scheduler",
    "RFlowScheduler": "scheduler",
    "DiffusionModelUNetMaisi": "unet",
    "AutoencoderKlMaisi": "autoencoder",
    "ControlNetMaisi": "controlnet",
}
_MAISI_NETWORKS = "monai.apps.generation.maisi.networks"
_MODULES = {
    "DiffusionModelUNet": (
        "monai.networks.nets",
        "monai.networks.nets.diffusion_model_unet",
        "generative.networks.nets",
    ),
    "AutoencoderKL": ("monai.networks.nets", "monai.networks.nets.autoencoderkl", "generative.networks.nets"),
    "DDPMScheduler": ("monai.networks.schedulers", "monai.networks.schedulers.ddpm", "generative.networks.schedulers"),
    "DDIMScheduler": ("monai.networks.schedulers", "monai.networks.schedulers.ddim", "generative.networks.schedulers"),
    # MAISI 1.0.0 ships a copy of MONAI's rectified flow as scripts/rectified_flow.py (MONAI 1.4 had none): its
    # target names MONAI's class here, and nothing in scripts/ is ever imported
    "RFlowScheduler": (
        "monai.networks.schedulers",
        "monai.networks.schedulers.rectified_flow",
        "scripts.rectified_flow",
    ),
    "DiffusionModelUNetMaisi": (_MAISI_NETWORKS, f"{_MAISI_NETWORKS}.diffusion_model_unet_maisi"),
    "AutoencoderKlMaisi": (_MAISI_NETWORKS, f"{_MAISI_NETWORKS}.autoencoderkl_maisi"),
    "ControlNetMaisi": (_MAISI_NETWORKS, f"{_MAISI_NETWORKS}.controlnet_maisi"),
}
ALLOWED_TARGETS: dict[str, str] = {
    f"{module}.{cls}": cls for cls, modules in _MODULES.items() for module in modules
} | {cls: cls for cls in _CLASSES}
#: MONAI classes whose keyword names are their own (MAISI's ``num_channels``), never renamed from MONAI Generative's
NATIVE_KWARGS = {"DiffusionModelUNetMaisi", "AutoencoderKlMaisi", "ControlNetMaisi", "RFlowScheduler"}
#: keyword names of MONAI Generative (before MONAI 1.4) -> MONAI's
OLD_KWARGS = {"num_channels": "channels", "use_checkpointing": "use_checkpoint"}
#: bundle-syntax keys that are instructions to MONAI's parser, not arguments
PARSER_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")


def find_config_file(folder: Path) -> Path | None:
    for name in CONFIG_NAMES:
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    return None


def _load_yaml(text: str) -> Any:
    """YAML as plain data, aliases refused: ``*x`` references let a few hundred bytes expand exponentially
    (or into a cycle), which would hang `meddiff models` on an untrusted bundle."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise MeddiffError(
                    f"YAML aliases (*{event.anchor}) are not supported in bundle configs "
                    f"(line {event.start_mark.line + 1})"
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_data_file(path: Path) -> Any:
    """JSON or YAML (safe loader without aliases: plain data only, nested at most `boundary.MAX_NESTING` deep)."""
    try:
        text = path.read_text()
        data = _load_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except MeddiffError as exc:
        raise MeddiffError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise MeddiffError(f"cannot read {path}: nested too deeply") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MeddiffError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        if type(exc).__module__.startswith("yaml"):
            raise MeddiffError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
        raise
    return check_nesting(data, str(path))


MAX_RESOLVED_NODES = 200_000  # a Zoo inference config resolves to a few thousand


class BundleConfig:
    """The parsed inference config of a bundle, with reference resolution restricted to literal data."""

    def __init__(self, data: Any, path: Path) -> None:
        if not isinstance(data, dict):
            raise MeddiffError(f"{path}: a bundle config must be a mapping, not {type(data).__name__}")
        self.data = data
        self.path = path
        self._resolved_nodes = 0  # references can fan out exponentially: resolution has a budget

    def get_raw(self, ref: str) -> Any:
        """The raw value at ``a#b#0`` (no resolution)."""
        node: Any = self.data
        for part in ref.split("#"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise MeddiffError(f"{self.path}: reference @{ref} points at nothing")
        return node

    def resolve(self, value: Any, key: str, seen: tuple[str, ...] = ()) -> Any:
        """``value`` with every ``@id`` replaced by its literal value; ``$``/``%`` values raise, naming ``key``."""
        self._resolved_nodes += 1
        if self._resolved_nodes > MAX_RESOLVED_NODES:
            raise MeddiffError(
                f"{self.path}: its references expand to more than {MAX_RESOLVED_NODES:,} values "
                f"(at {key}); not a config meddiff reads"
            )
        if isinstance(value, str):
            if value.startswith("$"):
                raise MeddiffError(
                    f"{self.path}: {key} is a Python expression ({value[:60]!r}); meddiff never evaluates bundle "
                    "expressions: give the literal value in the bundle's meddiff.json instead"
                )
            if value.startswith("%"):
                raise MeddiffError(f"{self.path}: {key} is a macro into another file ({value[:60]!r}); not supported")
            if value.startswith("@"):
                ref = value[1:]
                if ref in seen:
                    raise MeddiffError(f"{self.path}: circular reference @{ref} at {key}")
                return self.resolve(self.get_raw(ref), ref, seen + (ref,))
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{key}#{i}", seen) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value and key != "":
                target = self._target(value, key)
                if target not in ALLOWED_TARGETS:
                    raise MeddiffError(
                        f"{self.path}: {key} builds {target!r}, which is not a MONAI network or "
                        "scheduler that meddiff reads; nothing from a bundle is run"
                    )
            return {k: self.resolve(v, f"{key}#{k}", seen) for k, v in value.items() if k not in PARSER_KEYS}
        return value

    def _target(self, node: dict, key: str) -> Any:
        """A dict's ``_target_``: a class name, or an error naming this file and the key (not a TypeError that
        would be blamed on another file)."""
        target = node.get("_target_")
        if target is not None and not isinstance(target, str):
            raise MeddiffError(
                f"{self.path}: {key + '#' if key else ''}_target_ must be a class name (a string), not "
                f"{type(target).__name__} {shorten(repr(target), 60)}"
            )
        return target

    def literal(self, ref: str, default: Any = None) -> Any:
        """The resolved value at ``ref``, or ``default`` when it is absent or not plain data."""
        try:
            return self.resolve(self.get_raw(ref), ref)
        except MeddiffError:
            return default

    def components(self) -> dict[str, list[tuple[str, str, dict]]]:
        """Allow-listed ``_target_`` dicts anywhere in the config: role -> [(id, MONAI class, kwargs)].

        Only the kwargs of these are ever resolved (so a ``$`` in a component is an error naming it, and the
        rest of the config, with its expressions, is never looked at)."""
        found: dict[str, list[tuple[str, str, dict]]] = {}

        def walk(node: Any, ref: str) -> None:
            if isinstance(node, dict):
                target = self._target(node, ref)
                if isinstance(target, str) and target in ALLOWED_TARGETS:
                    cls = ALLOWED_TARGETS[target]
                    kwargs = {k: v for k, v in node.items() if k not in PARSER_KEYS}
                    rename = {} if cls in NATIVE_KWARGS else OLD_KWARGS
                    resolved = {rename.get(k, k): self.resolve(v, f"{ref}#{k}") for k, v in kwargs.items()}
                    found.setdefault(_CLASSES[cls], []).append((ref, cls, resolved))
                    return
                for k, v in node.items():
                    walk(v, f"{ref}#{k}" if ref else str(k))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{ref}#{i}")

        walk(self.data, "")
        return found


def read_bundle_config(folder: Path) -> BundleConfig:
    path = find_config_file(folder)
    if path is None:
        raise MeddiffError(f"{folder} has no configs/inference.json (or .yaml)")
    return BundleConfig(load_data_file(bundle_file(folder, path.relative_to(folder).as_posix())), path)


def bundle_file(folder: Path, rel: str) -> Path:
    """One of the bundle's own files (``configs/metadata.json``, ...), refused when it is a link out of it."""
    return inside_folder(folder, rel, str(folder / rel))
