"""Ships every model folder in models/ with the wheel, under <prefix>/share/napari-meddiff/models/<name>/."""

from pathlib import Path

from setuptools import setup

MODELS = Path(__file__).parent / "models"
data_files = (
    [
        (
            f"share/napari-meddiff/models/{d.name}",
            [str(f.relative_to(MODELS.parent)) for f in sorted(d.iterdir()) if f.is_file()],
        )
        for d in sorted(MODELS.iterdir())
        if (d / "model.json").is_file()
    ]
    if MODELS.is_dir()
    else []
)

setup(data_files=data_files)
