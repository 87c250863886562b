"""Conditional training (issue 16): conditions measured from each subject's labels, scaled to [0, 1] on the
training range, given to the UNet as cross-attention context or extra channels, trained with condition dropout
so that classifier-free guidance works; the exported model declares them for `--condition` and the sliders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_meddiff.errors import MeddiffError
from napari_meddiff.training import conditions as tc
from napari_meddiff.training.config import validate

TINY_UNET = {
    "channels": [8, 16],
    "attention_levels": [False, True],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from napari_meddiff.data.mni152 import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=0, progress=False)
    write_cohort(out, 1, seed=5, progress=False)  # seed 5 has a lesion
    return out


def config(tmp_path: Path, cohort: Path, how: str = "context", names=("brain_volume", "csf_volume")) -> Path:
    cfg = {
        "name": f"t-cond-{how}",
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [10.0, 10.0],
        "data": {"dir": str(cohort), "val_subjects": 1, "min_brain_fraction": 0.1},
        "networks": {"unet": dict(TINY_UNET)},
        "defaults": {"sampler": "ddim", "steps": 3},
        "conditioning": {"input": how, "dropout": 0.2, "conditions": list(names)},
        "training": {
            "steps": 3,
            "batch_size": 4,
            "val_every": 0,
            "log_every": 1,
            "checkpoint_minutes": 100,
            "num_threads": 1,
        },
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_measures_come_from_the_subjects_label_files(cohort):
    from napari_meddiff.io.volume import read_volume

    image = cohort / "sub-000000_T1w.nii.gz"
    labels = read_volume(cohort / "sub-000000_dseg.nii.gz")
    voxel_ml = float(np.prod(labels.spacing)) / 1000
    brain, csf_ml, lesion = tc.measure_subject(image, ["brain_volume", "csf_volume", "lesion_load"])
    assert brain == pytest.approx(np.isin(labels.array, [2, 3]).sum() * voxel_ml)
    assert csf_ml == pytest.approx((labels.array == 1).sum() * voxel_ml)
    assert 1000 < brain < 2500 and 50 < csf_ml < 800 and lesion == 0.0  # no lesion file: no lesion
    row = next(r for r in csv.DictReader(open(cohort / "cohort.csv")) if r["seed"] == "5")
    (lesion5,) = tc.measure_subject(cohort / "sub-000005_T1w.nii.gz", ["lesion_load"])
    assert lesion5 > 0 and lesion5 == pytest.approx(float(row["lesion_volume_ml"]), abs=1e-3)


@pytest.mark.parametrize("how", ["context", "concat"])
def test_a_conditional_model_trains_and_its_conditions_steer_guided_sampling(tmp_path, cohort, how):
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.pipeline import train

    out = train(config(tmp_path, cohort, how), out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    model = load_model(out)
    assert [c.name for c in model.conditions] == ["brain_volume", "csf_volume"]
    assert all(c.low == 0.0 and c.high == 1.0 and 0.0 <= c.default <= 1.0 for c in model.conditions)
    assert model.conditioning.null == (tc.NULL_VALUE, tc.NULL_VALUE)
    block = model.config["conditioning"]
    assert block["context"] == (how == "context") and block["concat"] == (how == "concat")
    lo, hi = block["conditions"][0]["unit_low"], block["conditions"][0]["unit_high"]
    assert 1000 < lo < hi < 2500 and "ml" in block["conditions"][0]["description"]
    unet = model.config["networks"]["unet"]
    if how == "context":
        assert unet["with_conditioning"] and unet["cross_attention_dim"] == 2 and unet["in_channels"] == 1
    else:
        assert unet["in_channels"] == 3 and not unet.get("with_conditioning")
    small = {"brain_volume": 0.0, "csf_volume": 1.0}
    large = {"brain_volume": 1.0, "csf_volume": 0.0}
    (a,), (b,), (a2,) = (
        generate(model, [7], steps=3, device="cpu", conditions=c, guidance_scale=3.0) for c in (small, large, small)
    )
    assert np.array_equal(a.array, a2.array)  # same seed and conditions: the same slice
    assert not np.array_equal(a.array, b.array)  # the conditions reach the network
    card = (out / "MODEL_CARD.md").read_text()
    assert "`brain_volume` brain (grey + white matter) volume: 0 = " in card and "classifier-free guidance" in card


def test_condition_dropout_replaces_a_share_of_the_batch_by_the_null_condition():
    values = torch.rand(2000, 3)
    dropped = tc.drop_conditions(values, 0.25, torch.Generator().manual_seed(0))
    null_rows = (dropped == tc.NULL_VALUE).all(1)
    assert 0.2 < float(null_rows.float().mean()) < 0.3
    assert torch.equal(dropped[~null_rows], values[~null_rows]) and torch.equal(
        tc.drop_conditions(values, 0.0, None), values
    )


def test_scaling_maps_the_training_range_to_0_1():
    ml = torch.tensor([[1000.0, 100.0], [1200.0, 300.0], [1100.0, 200.0]])
    ranges = tc.fit_ranges(ml, ["brain_volume", "csf_volume"])
    assert ranges == [(1000.0, 1200.0), (100.0, 300.0)]
    assert torch.allclose(tc.scale(ml, ranges), torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]))
    with pytest.raises(MeddiffError, match="lesion_load: every training subject has 0 ml"):
        tc.fit_ranges(torch.tensor([[0.0], [0.0]]), ["lesion_load"])  # no training subject has a lesion


@pytest.mark.parametrize(
    "block,kind,message",
    [
        ({"conditions": ["age"]}, "ddpm", "out of"),
        ({"conditions": ["brain_volume", "brain_volume"]}, "ddpm", "each once"),
        ({"conditions": ["brain_volume"], "dropout": 1.0}, "ddpm", "dropout"),
        ({"conditions": ["brain_volume"], "input": "film"}, "ddpm", "input"),
        ({"conditions": ["brain_volume"], "guidance": 2}, "ddpm", "unknown keys"),
        ({"conditions": ["brain_volume"]}, "segmentation", "generators"),
    ],
)
def test_bad_conditioning_blocks_are_user_errors(block, kind, message):
    raw = {
        "name": "x",
        "kind": kind,
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [2.0, 2.0],
        "data": {"dir": "."},
        "networks": {"unet": dict(TINY_UNET)},
        "conditioning": block,
    }
    with pytest.raises(MeddiffError, match=message):
        validate(raw)


def test_a_conditional_latent_model_takes_its_conditions_on_the_latents(tmp_path, cohort):
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.pipeline import train

    raw = yaml.safe_load(config(tmp_path, cohort, "concat", names=("csf_volume",)).read_text())
    raw.update(kind="ldm", spatial_dims=3, image_shape=[16, 16, 16], voxel_size=[10.0] * 3, name="t-cond-ldm")
    raw["networks"]["autoencoder"] = {
        "channels": [8, 8],
        "latent_channels": 2,
        "num_res_blocks": [1, 1],
        "attention_levels": [False, False],
        "norm_num_groups": 8,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }
    raw["autoencoder_training"] = {"steps": 2, "batch_size": 2, "val_every": 0, "checkpoint_minutes": 100}
    (tmp_path / "ldm.yaml").write_text(yaml.safe_dump(raw))
    out = train(tmp_path / "ldm.yaml", out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    model = load_model(out)
    assert model.config["networks"]["unet"]["in_channels"] == 2 + 1  # latent channels + one condition
    (a,), (b,) = (generate(model, [3], steps=3, device="cpu", conditions={"csf_volume": v}) for v in (0.0, 1.0))
    assert a.array.shape[:3] == (16, 16, 16) and not np.array_equal(a.array, b.array)


def test_a_conditional_unet_trains_on_an_existing_models_autoencoder(tmp_path, cohort):
    """autoencoder_training.from_model: the folder's autoencoder as it is (sha256-checked), no autoencoder stage."""
    from safetensors.torch import load_file

    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.testing.tiny_models import make_tiny_model
    from napari_meddiff.training.pipeline import train

    source = make_tiny_model(tmp_path / "shipped", kind="ldm", spatial_dims=3)
    shipped = load_model(source)
    raw = yaml.safe_load(config(tmp_path, cohort, "context", names=("brain_volume",)).read_text())
    raw.update(
        kind="ldm",
        spatial_dims=3,
        image_shape=[16, 16, 16],
        voxel_size=shipped.config["voxel_size"],
        name="t-cond-on-shipped",
        intensity=shipped.config["intensity"],
    )
    raw["networks"]["autoencoder"] = dict(shipped.config["networks"]["autoencoder"])
    raw["autoencoder_training"] = {"from_model": str(source)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MeddiffError, match="no autoencoder stage"):
        train(tmp_path / "c.yaml", work_dir=tmp_path / "r0", progress=False, autoencoder_only=True)
    out = train(tmp_path / "c.yaml", out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "autoencoder.pt").exists()  # nothing trained for the autoencoder
    theirs = load_file(source / shipped.config["weights"]["autoencoder"]["file"])
    model = load_model(out)
    ours = load_file(out / model.config["weights"]["autoencoder"]["file"])
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k].float(), ours[k].float()) for k in theirs)
    stage = model.config["training"]["autoencoder"]
    assert (
        stage["from_model"] == str(source)
        and stage["weights_sha256"] == shipped.config["weights"]["autoencoder"]["sha256"]
    )
    assert "not trained in this run" in (out / "MODEL_CARD.md").read_text()
    (a,), (b,) = (generate(model, [1], steps=3, device="cpu", conditions={"brain_volume": v}) for v in (0.0, 1.0))
    assert not np.array_equal(a.array, b.array)

    raw["voxel_size"] = [12.0, 12.0, 12.0]  # another voxel size: its latents would not be this data's
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MeddiffError, match="voxel_size differ"):
        train(tmp_path / "bad.yaml", out=tmp_path / "m2", work_dir=tmp_path / "r2", progress=False)


def test_evaluate_conditioning_sweeps_and_reports(tmp_path):
    """benchmarks/evaluate_conditioning.py end to end on a tiny 3D conditional model, with the k-means volume
    instrument and a lesion detector trained for a few steps (their figures mean nothing here)."""
    import json

    import evaluate_conditioning
    import lesion_detector

    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.training.pipeline import train

    data = tmp_path / "data"  # at fraction 0.5, of seeds 0-3 seed 1 has a lesion (3 is the validation subject)
    write_cohort(data, 4, seed=0, lesion_fraction=0.5, progress=False)
    raw = yaml.safe_load(config(tmp_path, data, names=("brain_volume", "csf_volume", "lesion_load")).read_text())
    raw.update(spatial_dims=3, image_shape=[16, 16, 16], voxel_size=[12.0, 12.0, 12.0])
    (tmp_path / "3d.yaml").write_text(yaml.safe_dump(raw))
    out = train(tmp_path / "3d.yaml", out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    detector = tmp_path / "detector"
    assert (
        lesion_detector.main(
            ["train", "--grid-of", str(out), "--data", str(data), "--out", str(detector), "--minutes", "0.02"]
        )
        == 0
    )
    meta = json.loads((detector / "detector.json").read_text())
    assert meta["steps"] >= 1 and meta["threshold_ml"] >= lesion_detector.MIN_THRESHOLD_ML
    resumed = tmp_path / "detector-resumed"  # resuming adds its steps to the first run's
    assert (
        lesion_detector.main(
            [
                "train",
                "--grid-of",
                str(out),
                "--data",
                str(data),
                "--out",
                str(resumed),
                "--minutes",
                "0.01",
                "--resume",
                str(detector),
            ]
        )
        == 0
    )
    again = json.loads((resumed / "detector.json").read_text())
    assert again["steps"] > meta["steps"] and again["resumed_from"] == str(detector)
    assert again["minutes"] > meta["minutes"] > 0
    heldout = write_cohort(tmp_path / "heldout", 2, seed=100000, progress=False).parent
    result = tmp_path / "cond.json"
    assert (
        evaluate_conditioning.main(
            [
                "--model",
                str(out),
                "--heldout",
                str(heldout),
                "--num-heldout",
                "2",
                "--instrument",
                "kmeans",
                "--lesion-detector",
                str(detector),
                "--levels",
                "0",
                "1",
                "--per-level",
                "2",
                "--out",
                str(result),
            ]
        )
        == 0
    )
    res = json.loads(result.read_text())
    assert set(res["conditions"]) == {"brain_volume", "csf_volume", "lesion_load"}
    check = res["instrument"]
    assert check["subjects"] == 2 and check["instrument"] == "kmeans" and check["real"]["brain_ml_mean"] > 0
    assert check["lesion"]["subjects"] == 2 and "sensitivity" in check["lesion"]["real"]
    levels = res["conditions"]["brain_volume"]["levels"]
    assert [r["level"] for r in levels] == [0.0, 1.0] and levels[0]["requested_ml"] < levels[1]["requested_ml"]
    assert all(0 <= r["lesion_appears"] <= 1 for r in res["conditions"]["lesion_load"]["levels"])
    assert res["conditions"]["csf_volume"]["n"] == 4 and result.with_suffix(".png").is_file()


def test_segmentation_instrument_measures_a_real_subject_on_a_coarse_grid(cohort):
    """The segdiff instrument (soft volumes of the shipped 2 mm segmentation model) on a subject resampled to the
    4 mm grid of a 3D generator: close to the volumes of its label files."""
    import evaluate_conditioning

    from napari_meddiff.io.intensity import intensity_window, normalise
    from napari_meddiff.io.volume import read_volume, resample, to_canonical

    image = resample(to_canonical(read_volume(cohort / "sub-000000_T1w.nii.gz")), (4.0, 4.0, 4.0))
    arr = np.asarray(image.array, np.float32)
    arr = normalise(arr, intensity_window(arr))  # the default window, as the generator's training config
    got = evaluate_conditioning.Instruments("segdiff", image.affine).volumes(arr)
    brain, csf_ml = tc.measure_subject(cohort / "sub-000000_T1w.nii.gz", ["brain_volume", "csf_volume"])
    assert got["brain_ml"] == pytest.approx(brain, rel=0.05) and got["csf_ml"] == pytest.approx(csf_ml, rel=0.35)


def test_a_resume_on_other_training_subjects_is_refused(tmp_path, cohort):
    """The [0, 1] scale is fixed at a run's start: a resume whose data give other ranges would change its meaning."""
    import shutil

    from napari_meddiff.training.pipeline import train

    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    cfg = config(tmp_path, data)
    train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "conditions.json").is_file()
    train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", resume=True, steps=4, overwrite=True, progress=False)
    from napari_meddiff.io.volume import read_volume, write_volume

    labels = read_volume(data / "sub-000001_dseg.nii.gz")  # a relabelled subject: the training range changes
    labels.array[labels.array == 3] = 0
    write_volume(labels, data / "sub-000001_dseg.nii.gz", kind="labels", overwrite=True)
    with pytest.raises(MeddiffError, match="scaled on"):
        train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", resume=True, steps=6, overwrite=True, progress=False)


def test_two_sample_test_samples_take_the_real_subjects_conditions(tmp_path, cohort):
    """evaluate_models.py gives a conditional generator the conditions of the held-out subjects in turn (their
    measures put on the model's scale), so the generated set has the real set's spread of volumes."""
    import evaluate_models

    from napari_meddiff.models import load_model
    from napari_meddiff.training.pipeline import train

    model = load_model(train(config(tmp_path, cohort), out=tmp_path / "m", work_dir=tmp_path / "run", progress=False))
    files = sorted(cohort.glob("*_T1w.nii.gz"))[:2]
    got = evaluate_models.heldout_conditions(model, files, 5)
    assert len(got) == 5 and got[0] == got[2] == got[4] and got[1] == got[3] and got[0] != got[1]
    for values, f in zip(got, files):
        for spec, ml in zip(model.conditions, tc.measure_subject(f, [s.name for s in model.conditions])):
            assert spec.low <= values[spec.name] <= spec.high
            if spec.unit_low <= ml <= spec.unit_high:
                assert spec.in_units(values[spec.name]) == pytest.approx(ml)
    from napari_meddiff.testing.tiny_models import make_tiny_model

    unconditional = load_model(make_tiny_model(tmp_path / "plain", kind="ddpm", spatial_dims=2))
    assert evaluate_models.heldout_conditions(unconditional, files, 5) is None
