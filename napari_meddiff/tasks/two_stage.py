"""Two-stage generation: a map generator draws a tissue map, a label-map model turns it into a scan.

A label-map model that names a ``label_map.generator`` generates without a map as well: for each seed the
generator (a ddpm over one-hot label maps, `DiffusionModel.label_output`) draws a map under the requested
conditions (brain, CSF, lesion volume: they are the generator's), and the label-map model generates the scan on
that map's grid with the same seed. Each scan keeps its map (``metadata["tissue_map"]``, written beside it as
``_dseg``: a free ground truth for segmentation research) and both stages' provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import ModelConfigView, describe_model, load_model

if TYPE_CHECKING:  # the widgets ask `conditions_model` on the GUI thread: no torch here
    from napari_meddiff.diffusion.loop import StepInfo
    from napari_meddiff.io.volume import Volume
    from napari_meddiff.models import DiffusionModel
    from napari_meddiff.tasks.generate import ConditionsArg


def map_generator_of(model: ModelConfigView) -> ModelConfigView:
    """The description of a label-map model's map generator, checked to draw the maps the model takes."""
    generator = describe_model(model.map_generator)
    if not generator.label_output:
        raise MeddiffError(f"{model.name}: its label_map.generator {generator.name} generates no label maps")
    if sorted(generator.label_output) != sorted(model.label_map) or any(
        generator.label_output[k] != model.label_map[k] for k in model.label_map
    ):
        raise MeddiffError(
            f"{model.name} takes labels {model.label_map} but its generator {generator.name} draws "
            f"{generator.label_output}"
        )
    return generator


def conditions_model(model: ModelConfigView, labels: object | None) -> ModelConfigView:
    """Whose conditions a generate request takes: the map generator's in a two-stage run, else the model's."""
    if labels is None and model.label_map and model.map_generator:
        return map_generator_of(model)
    return model


def generate_two_stage(
    model: DiffusionModel,
    seeds: Sequence[int],
    *,
    sampler: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 1,
    eta: float = 0.0,
    conditions: ConditionsArg = None,
    guidance_scale: float = 1.0,
    on_step: Callable[[StepInfo], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
    on_preview: Callable[[Volume], None] | None = None,
    preview_every: int = 0,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Volume]:
    """One scan per seed, each from a map its model's generator draws with that seed and ``conditions`` (the
    generator samples at its own defaults; ``sampler``, ``steps``, ``eta`` and ``precision`` are the scan's).
    ``on_stage(name, index)``: called as stage 1 ("tissue map") and each stage-2 scan begin; ``on_preview``
    receives the scan's previews (stage 2) every ``preview_every`` steps."""
    from napari_meddiff.tasks.from_labels import generate_from_labels
    from napari_meddiff.tasks.generate import generate

    generator_name = map_generator_of(model).name
    generator = load_model(generator_name, model.device)
    if on_stage is not None:
        on_stage("tissue map", 0)
    maps = generate(
        generator, list(seeds), device=str(model.device), batch_size=batch_size, conditions=conditions,
        guidance_scale=guidance_scale, on_step=on_step, should_cancel=should_cancel,
    )  # fmt: skip
    del generator
    scans = []
    for i, (seed, tissue_map) in enumerate(zip(seeds, maps)):
        if on_stage is not None:
            on_stage("scan", i)
        (scan,) = generate_from_labels(
            model, tissue_map, int(seed), sampler=sampler, steps=steps, device=str(model.device),
            precision=precision, eta=eta, on_step=on_step, on_preview=on_preview, preview_every=preview_every,
            should_cancel=should_cancel,
        )  # fmt: skip
        map_record = dict(tissue_map.metadata["provenance"])
        record = scan.metadata["provenance"]
        record.pop("label_map_sha256")  # not a setting of the cohort: each subject's map is its own
        map_record["voxels"] = record.pop("label_map")["voxels"]
        record["tissue_map"] = map_record
        for key in ("conditions", "guidance_scale"):  # what the cohort was asked for: the generator's
            if key in map_record:
                record[key] = map_record[key]
        record["seconds"] = round(record["seconds"] + map_record["seconds"], 3)
        scan.metadata["tissue_map"] = tissue_map
        scans.append(scan)
    return scans
