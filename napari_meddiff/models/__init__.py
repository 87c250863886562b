"""Models: find them, read their configs, load them, whatever their format.

Formats (one module each) turn a folder into the same validated config (this package's ``model.json``
schema) and the same MONAI networks, so tasks and widgets only ever see a `DiffusionModel`:

* `folder` - this package's model folders (``model.json`` + safetensors);
* `bundle` - MONAI Model Zoo bundles (``configs/inference.json``, ``configs/metadata.json``, ``models/*.pt``),
  read as data: no expression evaluated, no script imported, weights via ``torch.load(weights_only=True)``.
"""

from napari_meddiff.models.conditions import Conditioning, ConditionSpec
from napari_meddiff.models.folder import check_model_target, foreign_files, save_model_folder
from napari_meddiff.models.model import (
    DEFAULT_SAMPLING,
    NETWORK_NAMES,
    DiffusionModel,
    ModelConfigView,
    build_network,
    count_parameters,
    sha256_file,
)
from napari_meddiff.models.registry import (
    DEFAULT_INPAINT_MODEL,
    DEFAULT_LABEL_MODEL,
    DEFAULT_MODEL,
    FORMATS,
    BrokenModel,
    ModelDescription,
    available_models,
    broken_models,
    describe_model,
    find_model_dir,
    format_of,
    load_model,
    model_search_path,
    read_config,
)
from napari_meddiff.models.schema import MODEL_KINDS

__all__ = [
    "BrokenModel",
    "ConditionSpec",
    "Conditioning",
    "DEFAULT_INPAINT_MODEL",
    "DEFAULT_LABEL_MODEL",
    "DEFAULT_MODEL",
    "DEFAULT_SAMPLING",
    "DiffusionModel",
    "FORMATS",
    "MODEL_KINDS",
    "ModelConfigView",
    "ModelDescription",
    "NETWORK_NAMES",
    "available_models",
    "broken_models",
    "build_network",
    "check_model_target",
    "count_parameters",
    "describe_model",
    "find_model_dir",
    "foreign_files",
    "format_of",
    "load_model",
    "model_search_path",
    "read_config",
    "save_model_folder",
    "sha256_file",
]
