"""Two-stage generation: a map generator draws a tissue map, a label-map model turns it into a scan (the run:
`napari_meddiff.tasks.generate.generate_two_stage`; here, which model draws and whose conditions a request takes,
without torch: the widgets ask on the GUI thread).

A label-map model that names a ``label_map.generator`` generates without a map as well: for each seed the
generator (a ddpm over one-hot label maps, `DiffusionModel.label_output`) draws a map under the requested
conditions (brain, CSF, lesion volume: they are the generator's), and the label-map model generates the scan on
that map's grid with the same seed. Each scan keeps its map (``metadata["tissue_map"]``, written beside it as
``_dseg``: a free ground truth for segmentation research) and both stages' provenance.
"""

from __future__ import annotations

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import ModelConfigView, describe_model


def map_generator_of(model: ModelConfigView) -> ModelConfigView:
    """The description of a label-map model's map generator, checked to draw the maps the model takes."""
    generator = describe_model(model.map_generator)
    if not generator.label_output:
        raise MeddiffError(f"{model.name}: its label_map.generator {generator.name} generates no label maps")
    if generator.label_output != model.label_map:
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


def map_chain_steps(conditioned: ModelConfigView, model: ModelConfigView) -> int:
    """The steps of a request's map chain: the generator's default when `conditions_model` gave the generator
    (a two-stage run), else 0."""
    return int(conditioned.sampling_defaults["steps"]) if conditioned is not model else 0
