"""Training pipeline: two steps of each kind on a tiny cohort write model folders that load and sample;
checkpoints resume (step counter and optimizer state); config errors are user errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_meddiff.errors import MeddiffError
from tests.helpers import REPO

TINY_UNET = {
    "channels": [8, 16],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}
TINY_AE = {
    "channels": [8, 8],
    "latent_channels": 2,
    "num_res_blocks": [1, 1],
    "attention_levels": [False, False],
    "norm_num_groups": 8,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
FAST = {
    "steps": 2,
    "batch_size": 2,
    "val_every": 0,
    "val_samples": 2,
    "val_steps": 2,
    "log_every": 1,
    "checkpoint_minutes": 100,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from napari_meddiff.data.mni152 import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=0, progress=False)
    return out


def tiny_config(tmp_path: Path, cohort: Path, kind: str, spatial_dims: int = 2) -> Path:
    cfg = {
        "name": f"t-{kind}-{spatial_dims}d",
        "kind": kind,
        "spatial_dims": spatial_dims,
        "image_shape": [16, 16] if spatial_dims == 2 else [16, 16, 16],
        "voxel_size": [10.0] * spatial_dims,
        "data": {"dir": str(cohort), "val_subjects": 1, "min_brain_fraction": 0.1},
        "networks": {"unet": dict(TINY_UNET)},
        "defaults": {"sampler": "dpm++", "steps": 2},
        "training": dict(FAST),
    }
    if kind == "ddpm":
        cfg["scheduler"] = {"prediction_type": "epsilon"}  # the default is v_prediction; cover both
    if kind == "ldm":
        cfg["networks"]["autoencoder"] = dict(TINY_AE)
        cfg["autoencoder_training"] = {**FAST, "adv_warmup_steps": 1}
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind,dims", [("ddpm", 2), ("ldm", 3), ("segmentation", 2)])
def test_two_steps_write_a_loadable_model(tmp_path, cohort, kind, dims):
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.pipeline import segment_slices, train

    cfg = tiny_config(tmp_path, cohort, kind, dims)
    out = train(cfg, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False)
    assert (out / "model.json").is_file() and (out / "MODEL_CARD.md").is_file() and (out / "train.yaml").is_file()
    model = load_model(out)
    assert model.kind == kind
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Measured" in card and "seeds" in card
    assert model.config["data"]["train_seeds"] == [0, 1]
    assert model.config["training"]["diffusion"]["steps"] == 2
    assert (tmp_path / "run" / "loss_diffusion.png").is_file()
    if kind == "segmentation":
        labels = segment_slices(model, torch.rand(2, 1, 16, 16), steps=2)
        assert labels.shape == (2, 16, 16) and int(labels.max()) < 4
    else:
        (vol,) = generate(model, [0], steps=2, device="cpu")
        assert vol.array.shape[:dims] == tuple(model.image_shape)
    if kind == "ldm":
        assert model.config["latent"]["scale_factor"] > 0
        assert model.config["training"]["autoencoder"]["steps"] == 2
        assert (tmp_path / "run" / "latents.pt").is_file()


def test_decoder_only_resume_keeps_the_cached_latents(tmp_path, cohort):
    """An LDM run resumed with ``freeze_encoder``: the autoencoder trains on (its decoder), the latent cache is
    used as it is (its key is the encoder's digest; recomputing would draw other posterior samples), the
    diffusion UNet resumes, and the exported autoencoder has the new decoder and the old encoder."""
    from napari_meddiff.models import load_model
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.pipeline import train

    path = tiny_config(tmp_path, cohort, "ldm", 3)
    train(path, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    before = load_checkpoint(tmp_path / "run" / "latents.pt")
    ae_before = load_model(tmp_path / "m").autoencoder.state_dict()
    cfg = yaml.safe_load(path.read_text())
    cfg["autoencoder_training"].update(steps=4, freeze_encoder=True)
    cfg["training"]["steps"] = 3
    path.write_text(yaml.safe_dump(cfg))
    train(path, out=tmp_path / "m", work_dir=tmp_path / "run", resume=True, progress=False, overwrite=True)
    after = load_checkpoint(tmp_path / "run" / "latents.pt")
    assert torch.equal(before["latents"], after["latents"]) and before["encoder_sha256"] == after["encoder_sha256"]
    assert load_checkpoint(tmp_path / "run" / "autoencoder.pt")["step"] == 4
    assert load_checkpoint(tmp_path / "run" / "diffusion.pt")["step"] == 3
    model = load_model(tmp_path / "m")
    assert model.config["training"]["autoencoder"]["freeze_encoder"] is True
    ae_after = model.autoencoder.state_dict()
    enc = [k for k in ae_after if k.startswith(("encoder.", "quant_conv_mu.", "quant_conv_log_sigma."))]
    assert enc and all(torch.equal(ae_before[k], ae_after[k]) for k in enc)
    assert any(not torch.equal(ae_before[k], ae_after[k]) for k in ae_after if k.startswith("decoder."))


def test_latents_mean_trains_on_the_encoder_means(tmp_path, cohort):
    """``training.latents: mean``: the UNet's data are the scaled posterior means of the training volumes (and of
    their mirror images), not draws; switching a run from draws to means re-encodes instead of reusing the cache."""
    from napari_meddiff.models import load_model
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.data import load_dataset
    from napari_meddiff.training.pipeline import train

    path = tiny_config(tmp_path, cohort, "ldm", 3)
    train(path, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    drawn = load_checkpoint(tmp_path / "run" / "latents.pt")
    assert drawn["latent_kind"] == "sample"
    cfg = yaml.safe_load(path.read_text())
    cfg["training"].update(latents="mean", steps=3)
    path.write_text(yaml.safe_dump(cfg))
    train(path, out=tmp_path / "m", work_dir=tmp_path / "run", resume=True, progress=False, overwrite=True)
    cache = load_checkpoint(tmp_path / "run" / "latents.pt")
    assert cache["latent_kind"] == "mean" and cache["encoder_sha256"] == drawn["encoder_sha256"]
    model = load_model(tmp_path / "m")
    assert model.config["training"]["diffusion"]["latents"] == "posterior means of the autoencoder"
    images = load_dataset(load_config(path), subjects=slice(0, 2), progress=False).images
    with torch.no_grad():
        ae = model.autoencoder.eval()
        means = torch.cat([ae.encode(images)[0], ae.encode(images.flip(2))[0]])
    scale = cache["scale_factor"]
    assert scale == pytest.approx(1.0 / float(means[: len(images)].std()), rel=1e-5)  # from the unmirrored
    torch.testing.assert_close(cache["latents"], means * scale, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(drawn["latents"], cache["latents"], atol=1e-3)  # the draws were other latents
    cfg["training"]["latents"] = "mode"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MeddiffError, match="training.latents must be one of sample, mean"):
        load_config(path)


def test_resume_continues_from_checkpoint(tmp_path, cohort):
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.pipeline import train

    cfg = tiny_config(tmp_path, cohort, "ddpm", 2)
    train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)
    first = load_checkpoint(tmp_path / "run" / "diffusion.pt")
    assert first["step"] == 2
    train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", resume=True, steps=4, progress=False, overwrite=True)
    second = load_checkpoint(tmp_path / "run" / "diffusion.pt")
    assert second["step"] == 4
    opt_steps = {float(s["step"]) for s in second["optimizer"]["state"].values()}
    assert opt_steps == {4.0}  # Adam's own counter continued, so its moments were restored
    assert [s for s, _ in second["history"]["loss"]] == [1, 2, 3, 4]
    # without --resume an earlier run's checkpoints are never discarded silently; --fresh starts again
    with pytest.raises(MeddiffError, match="holds checkpoints of an earlier run"):
        train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False, overwrite=True)
    train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False, overwrite=True, fresh=True)
    assert load_checkpoint(tmp_path / "run" / "diffusion.pt")["step"] == 2
    # resuming from the run's own copy of the config (it is not copied onto itself)
    train(
        tmp_path / "run" / "train.yaml",
        out=tmp_path / "m",
        work_dir=tmp_path / "run",
        resume=True,
        steps=3,
        progress=False,
        overwrite=True,
    )
    assert load_checkpoint(tmp_path / "run" / "diffusion.pt")["step"] == 3


def test_max_minutes_stops_and_exports(tmp_path, cohort):
    from napari_meddiff.models import load_model
    from napari_meddiff.training.pipeline import train

    cfg = tiny_config(tmp_path, cohort, "ddpm", 2)
    out = train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", steps=10_000, max_minutes=0.02, progress=False)
    steps = load_model(out).config["training"]["diffusion"]["steps"]
    assert 1 <= steps < 10_000


def test_a_non_finite_gradient_skips_the_step_and_leaves_the_weights_finite():
    from napari_meddiff.training.device_setup import grad_scaler
    from napari_meddiff.training.optim import clip_and_step

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    loss = (net(torch.ones(1, 3)) * float("inf")).sum()
    gnorm = clip_and_step(loss, net, opt, grad_scaler(torch.device("cpu"), "fp32"), 1.0)
    assert not np.isfinite(gnorm)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    clip_and_step(net(torch.ones(1, 3)).sum(), net, opt, grad_scaler(torch.device("cpu"), "fp32"), None)
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # a finite one steps, unclipped


def test_a_diverging_run_stops_with_a_one_line_diagnosis(tmp_path, cohort, capsys):
    from napari_meddiff.cli import main

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "ddpm", 2).read_text())
    cfg["training"].update(lr=1e30, steps=4, grad_clip=None)  # the first step throws the weights to 1e30
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["train", str(path), "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training diverged: non-finite" in err and "at step 1" in err and "unexpected" not in err
    assert not (tmp_path / "m").exists()


def test_config_errors_are_user_errors(tmp_path, cohort):
    from napari_meddiff.training.config import load_config, validate

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: gan\n")
    with pytest.raises(MeddiffError, match="lacks"):
        load_config(bad)
    good = yaml.safe_load(tiny_config(tmp_path, cohort, "ddpm").read_text())
    with pytest.raises(MeddiffError, match="kind"):
        validate({**good, "kind": "gan"})
    with pytest.raises(MeddiffError, match="image_shape"):
        validate({**good, "image_shape": [16, 16, 16]})
    with pytest.raises(MeddiffError, match="upper_value"):
        validate({**good, "intensity": {"upper_value": 0}})
    with pytest.raises(MeddiffError, match="unknown key"):
        validate({**good, "intensity": {"high": 99.5}})
    with pytest.raises(MeddiffError, match="does not exist"):
        from napari_meddiff.training.data import list_subjects

        list_subjects({**good["data"], "dir": str(tmp_path / "nope")}, with_labels=False)
    bad.write_text(": : :\n  - [")
    with pytest.raises(MeddiffError, match="YAML"):
        load_config(bad)


def test_heldout_seeds_are_refused(tmp_path):
    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.training.pipeline import train

    held = write_cohort(tmp_path / "held", 1, seed=100_000, progress=False).parent
    cfg = tiny_config(tmp_path, held, "ddpm", 2)
    with pytest.raises(MeddiffError, match="held-out"):
        train(cfg, out=tmp_path / "m", work_dir=tmp_path / "run", progress=False)


def test_autoencoder_only_stops_after_the_autoencoder_and_resumes_from_it(tmp_path, cohort, capsys):
    from napari_meddiff.cli import main
    from napari_meddiff.training.checkpoints import load_checkpoint

    cfg = tiny_config(tmp_path, cohort, "ldm", 3)
    argv = [
        "train",
        str(cfg),
        "--out",
        str(tmp_path / "m"),
        "--work-dir",
        str(tmp_path / "r"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--autoencoder-only"]) == 0
    assert load_checkpoint(tmp_path / "r" / "autoencoder.pt")["step"] == 2
    assert not (tmp_path / "r" / "diffusion.pt").exists() and not (tmp_path / "m").exists()
    assert "model written" not in capsys.readouterr().out
    assert main([*argv, "--autoencoder-only", "--resume", "--steps", "3"]) == 0
    assert load_checkpoint(tmp_path / "r" / "autoencoder.pt")["step"] == 3
    assert main([*argv, "--resume", "--steps", "3"]) == 0  # then the diffusion stage, from that autoencoder
    assert load_checkpoint(tmp_path / "r" / "diffusion.pt")["step"] == 3 and (tmp_path / "m" / "model.json").is_file()
    ddpm = tiny_config(tmp_path, cohort, "ddpm", 2)
    assert main(["train", str(ddpm), "--autoencoder-only", "--work-dir", str(tmp_path / "d")]) == 2
    assert "only an ldm has an autoencoder" in capsys.readouterr().err


def test_cli_train(tmp_path, cohort, capsys):
    from napari_meddiff.cli import main

    cfg = tiny_config(tmp_path, cohort, "ddpm", 2)
    rc = main(
        [
            "train",
            str(cfg),
            "--out",
            str(tmp_path / "m"),
            "--work-dir",
            str(tmp_path / "r"),
            "--steps",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0 and (tmp_path / "m" / "model.json").is_file()
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind,dims,stage,signum", [("ldm", 3, "autoencoder", "SIGTERM"), ("ddpm", 2, "diffusion", "SIGINT")]
)
def test_a_signal_checkpoints_the_step_reached_and_resume_goes_on(
    tmp_path, cohort, capsys, monkeypatch, kind, dims, stage, signum
):
    """Ctrl-C or SIGTERM (a session's end, a job scheduler) mid-training: the loop ends after the current step,
    writes its checkpoint (not the one of up to checkpoint_minutes before) and exits 128 + the signal; no model
    folder is written. The process's own handlers are back afterwards."""
    import importlib
    import signal

    from napari_meddiff.cli import main
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.optim import clip_and_step

    sig = getattr(signal, signum)
    real_step, calls, after_first = clip_and_step, [], []

    def step_then_signal(*args, **kwargs):  # the signal arrives during the third optimiser step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
            after_first.append(signal.getsignal(sig))  # a second one would act as without the stop request
        return real_step(*args, **kwargs)

    training_loop = importlib.import_module(f"napari_meddiff.training.{stage}")
    monkeypatch.setattr(training_loop, "clip_and_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cfg = tiny_config(tmp_path, cohort, kind, dims)
    argv = [
        "train",
        str(cfg),
        "--out",
        str(tmp_path / "m"),
        "--work-dir",
        str(tmp_path / "r"),
        "--no-progress",
        "--device",
        "cpu",
        "--steps",
        "50",
    ]
    assert main(argv) == 128 + sig
    err = capsys.readouterr().err
    ckpt = tmp_path / "r" / f"{stage}.pt"
    # the third optimiser step is step 3, or step 2 where the discriminator takes a step of its own
    reached = 3 if stage == "diffusion" else 2
    assert f"{stage} training stopped at step {reached} ({signum})" in err and "--resume" in err
    assert load_checkpoint(ckpt)["step"] == reached and not (tmp_path / "m").exists()  # checkpoint_minutes: 100
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert after_first == [before[0] if sig == signal.SIGTERM else before[1]]
    monkeypatch.setattr(training_loop, "clip_and_step", real_step)
    assert main([*argv[:-1], str(reached + 1), "--resume"]) == 0
    assert load_checkpoint(ckpt)["step"] == reached + 1 and (tmp_path / "m" / "model.json").is_file()


def test_the_stop_request_leaves_an_ignored_signal_ignored():
    import signal

    from napari_meddiff.training.stopping import STOP

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with STOP:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == STOP._handle
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: no stop asked
        assert not STOP.requested and signal.getsignal(signal.SIGINT) != STOP._handle
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, cohort):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cfg = tiny_config(tmp_path, cohort, "ddpm", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "napari_meddiff.cli",
            "train",
            str(cfg),
            "--out",
            str(tmp_path / "m"),
            "--work-dir",
            str(tmp_path / "r"),
            "--steps",
            "2",
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from napari_meddiff.models import load_model

    model = load_model(tmp_path / "m")
    assert model.config["training"]["diffusion"]["world_size"] == 2


def _example(name: str):
    import importlib.util

    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mednist_preparation_on_fake_data(tmp_path):
    import numpy as np
    from PIL import Image

    from napari_meddiff.training.config import validate
    from napari_meddiff.training.data import load_dataset

    mod = _example("train_mednist")
    rng = np.random.default_rng(0)
    for cls, n in (("HeadCT", 20), ("Hand", 3)):
        (tmp_path / "MedNIST" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(
                tmp_path / "MedNIST" / cls / f"{i:06d}.jpeg"
            )
    out = mod.prepare_mednist(tmp_path, tmp_path / "nifti", "HeadCT", download=False)
    files = sorted(out.glob("img-*.nii.gz"))
    assert 10 <= len(files) <= 20
    cfg = validate(mod.mednist_config("m", out, 1.0))
    data = load_dataset(cfg, progress=False)
    assert data.images.shape == (len(files), 1, 64, 64)
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    with pytest.raises(SystemExit, match="classes"):
        mod.prepare_mednist(tmp_path, tmp_path / "n2", "Nope", download=False)


def test_decathlon_preparation_on_fake_data(tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    from napari_meddiff.training.config import validate
    from napari_meddiff.training.data import load_dataset

    mod = _example("train_decathlon")
    task = tmp_path / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        img = rng.random((60, 60, 16, 4)).astype(np.float32)
        img[10:50, 10:50, 3:13] += 2
        lab = np.zeros((60, 60, 16), np.uint8)
        lab[12:16, 12:16, 8:12] = 1 + i % 3
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 2.0, 2.0, 1.0])), task / "imagesTr" / f"BRATS_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.0, 1.0])), task / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "BRATS",
                "description": "fake",
                "reference": "fake",
                "licence": "none",
                "release": "0",
                "tensorImageSize": "4D",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "numTraining": 3,
                "numTest": 0,
                "training": training,
                "test": [],
            }
        )
    )
    out, classes = mod.prepare_decathlon(tmp_path, "Task01_BrainTumour", tmp_path / "nifti", channel=1)
    assert classes[0] == "background" and len(classes) == 4
    assert len(sorted(out.glob("*_img.nii.gz"))) == 3 and len(sorted(out.glob("*_seg.nii.gz"))) == 3
    for kind in ("segmentation", "ldm", "ddpm"):
        cfg = validate(mod.decathlon_config("d", kind, out, classes, 1.0))
        assert cfg["kind"] == kind
    cfg = validate(mod.decathlon_config("d", "segmentation", out, classes, 1.0))
    data = load_dataset(cfg, progress=False)
    assert data.images.shape[1:] == (1, 64, 64) and int(data.labels.max()) <= 3


def test_crop_pair_keeps_images_and_labels_aligned():
    from napari_meddiff.training.diffusion import crop_pair

    labels = torch.randint(0, 4, (3, 12, 10))
    images = torch.stack([labels.float(), -labels.float()], dim=1)  # the image is the label map
    g = torch.Generator().manual_seed(0)
    x, y = crop_pair(images, labels, [5, 7], g)
    assert x.shape == (3, 2, 5, 7) and y.shape == (3, 5, 7) and y.dtype == labels.dtype
    assert torch.equal(x[:, 0].long(), y) and torch.equal(x[:, 1], -x[:, 0])
    for b in range(3):  # each item a window of its original, not resampled
        assert any(
            torch.equal(labels[b, i : i + 5, j : j + 7], y[b]) for i in range(12 - 5 + 1) for j in range(10 - 7 + 1)
        )
    same_x, same_y = crop_pair(images, labels, None, g)
    assert same_x is images and same_y is labels


def test_random_crop_draws_a_window_per_item():
    """A batch of crops covers as many places as it has items (a local task learns from more of each volume)."""
    from napari_meddiff.training.data import random_crop

    place = torch.arange(30 * 30, dtype=torch.float32).reshape(1, 1, 30, 30).expand(8, 1, 30, 30)
    crops = random_crop(place, [6, 6], torch.Generator().manual_seed(0))
    corners = {int(c[0, 0, 0]) for c in crops}
    assert crops.shape == (8, 1, 6, 6) and len(corners) > 1
    again = random_crop(place, [6, 6], torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)  # the same generator draws the same windows


def test_segmentation_trains_on_crops_then_whole_slices(tmp_path, cohort):
    from napari_meddiff.models import load_model
    from napari_meddiff.training.pipeline import train

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "segmentation").read_text())
    cfg["training"].update(steps=3, patch_size=[8, 8], patch_steps=2)
    path = tmp_path / "crops.yaml"
    path.write_text(yaml.safe_dump(cfg))
    model = load_model(train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False))
    assert model.config["training"]["diffusion"]["steps"] == 3
    for bad, match in (([8], "patch_size"), ([8, 64], "patch_size"), ([8, 0], "patch_size"), ("8", "patch_size")):
        cfg["training"]["patch_size"] = bad
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(MeddiffError, match=match):
            train(path, out=tmp_path / "model2", work_dir=tmp_path / "run2", progress=False)
    assert not (tmp_path / "model2").exists()


def test_segmentation_with_context_slices_trains_and_segments(tmp_path, cohort):
    """A 2.5D model: each training slice comes with its neighbours as channels (the slice itself in the middle),
    the UNet takes them, and `segment` gives the model the same neighbours."""
    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.segment import plan_segmentation, segment
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.data import load_dataset
    from napari_meddiff.training.pipeline import train

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "segmentation").read_text())
    plain = load_dataset(load_config(_write(tmp_path / "plain.yaml", cfg)), progress=False)
    cfg["segmentation"] = {"context_slices": 1}
    path = _write(tmp_path / "context.yaml", cfg)
    loaded = load_config(path)
    assert loaded["networks"]["unet"]["in_channels"] == 4 + 3
    data = load_dataset(loaded, progress=False)
    assert data.images.shape == (plain.images.shape[0], 3, 16, 16)
    assert torch.equal(data.images[:, 1], plain.images[:, 0])  # the slice itself in the middle
    first = [i for i in range(1, len(data.subjects)) if data.subjects[i] == data.subjects[i - 1]][0]
    assert torch.equal(data.images[first, 0], plain.images[first - 1, 0])  # kept slices are consecutive here
    model = load_model(train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False))
    assert model.config["segmentation"]["context_slices"] == 1
    image = read_volume(next(cohort.glob("*_T1w.nii.gz")))
    plan = plan_segmentation(model, image)
    tiles = plan.item_images()
    assert tiles.shape == (plan.num_items, 3, 16, 16)
    where = {s: n for n, s in enumerate(plan.starts)}  # (in-plane tile start, slice) -> item
    for (s0, s1, k), n in where.items():
        below = where.get((s0, s1, k - 1))
        if below is None:
            assert k == 0
        else:
            assert np.array_equal(tiles[n, 0], tiles[below, 1]) and np.array_equal(tiles[below, 2], tiles[n, 1])
    res = segment(model, image, ensemble=1, steps=1, sampler="ddim")
    assert res.labels.shape == image.shape
    cfg["spatial_dims"], cfg["image_shape"], cfg["voxel_size"] = 3, [16, 16, 16], [10.0] * 3
    with pytest.raises(MeddiffError, match="context_slices"):
        load_config(_write(tmp_path / "bad.yaml", cfg))


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_init_from_widens_a_single_slice_model_to_context_slices(tmp_path, cohort):
    """init_from: a 2.5D model starts as the 2D model it grows from (same outputs whatever the neighbours), and
    its steps and minutes carry on from the earlier run."""
    from napari_meddiff.models import build_network, load_model
    from napari_meddiff.training.checkpoints import load_checkpoint, load_widened
    from napari_meddiff.training.pipeline import train

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "segmentation").read_text())
    train(_write(tmp_path / "plain.yaml", cfg), out=tmp_path / "plain", work_dir=tmp_path / "run1", progress=False)
    state = load_checkpoint(tmp_path / "run1" / "diffusion.pt")
    cfg["segmentation"] = {"context_slices": 1}
    cfg["training"].update(steps=3, init_from=str(tmp_path / "run1" / "diffusion.pt"))
    model = load_model(
        train(_write(tmp_path / "ctx.yaml", cfg), out=tmp_path / "ctx", work_dir=tmp_path / "run2", progress=False)
    )
    diff = model.config["training"]["diffusion"]
    assert (
        diff["steps"] == 3
        and diff["init_from"]["step"] == 2
        and diff["init_from"]["widened"] == ["conv_in.conv.weight"]
    )
    assert diff["minutes"] >= diff["init_from"]["minutes"]

    old_cfg = {**TINY_UNET, "spatial_dims": 2, "in_channels": 5, "out_channels": 4}
    old, new = build_network("unet", old_cfg).eval(), build_network("unet", {**old_cfg, "in_channels": 7}).eval()
    assert load_widened(new, state["ema"], lambda i: i if i < 4 else i + 1) == ["conv_in.conv.weight"]
    old.load_state_dict(state["ema"])
    x, image, t = torch.randn(2, 4, 16, 16), torch.rand(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        want = old(torch.cat([x, image], 1), timesteps=t)
        for neighbours in (torch.zeros(2, 2, 16, 16), torch.rand(2, 2, 16, 16)):
            got = new(torch.cat([x, neighbours[:, :1], image, neighbours[:, 1:]], 1), timesteps=t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(MeddiffError, match="only input channels"):
        load_widened(build_network("unet", {**old_cfg, "out_channels": 3}), state["ema"], lambda i: i)
    # the run's own channel map (diffusion._init_from): the image lands in the middle of its neighbours
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.diffusion import _init_from
    from napari_meddiff.training.optim import EMA

    for context in (1, 2):
        cfg["segmentation"] = {"context_slices": context}
        loaded = load_config(_write(tmp_path / f"ctx{context}.yaml", cfg))
        net = build_network("unet", loaded["networks"]["unet"])
        ema = EMA(net, 0.9)
        info = _init_from(tmp_path / "run1" / "diffusion.pt", net, ema, loaded)
        assert info["step"] == 2 and info["widened"] == ["conv_in.conv.weight"]
        for module in (net.eval(), ema.module):
            with torch.no_grad():
                nb = torch.rand(2, 2 * context, 16, 16)
                got = module(torch.cat([x, nb[:, :context], image, nb[:, context:]], 1), timesteps=t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_init_from_a_model_folder_fine_tunes_it_at_another_image_size(tmp_path, cohort):
    """init_from: a shipped model folder (sha256-checked safetensors) is a starting point too, for example to
    train the same network at a finer grid; its steps and minutes carry on."""
    from napari_meddiff.models import load_model
    from napari_meddiff.training.pipeline import train

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "ddpm").read_text())
    first = load_model(
        train(_write(tmp_path / "a.yaml", cfg), out=tmp_path / "a", work_dir=tmp_path / "run1", progress=False)
    )
    cfg["image_shape"], cfg["voxel_size"] = [24, 20], [7.0, 7.0]
    cfg["training"].update(steps=3, init_from=str(tmp_path / "a"))
    path = _write(tmp_path / "b.yaml", cfg)
    from napari_meddiff.models import build_network
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.diffusion import _init_from
    from napari_meddiff.training.optim import EMA

    loaded = load_config(path)
    net = build_network("unet", loaded["networks"]["unet"])
    info = _init_from(tmp_path / "a", net, EMA(net, 0.9), loaded)
    assert info["step"] == 2 and info["widened"] == []
    for name, value in first.unet.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    second = load_model(train(path, out=tmp_path / "b", work_dir=tmp_path / "run2", progress=False))
    diff = second.config["training"]["diffusion"]
    assert diff["steps"] == 3 and diff["init_from"]["step"] == 2 and second.config["image_shape"] == [24, 20]
    assert diff["init_from"]["weights_sha256"] == first.config["weights"]["unet"]["sha256"]
    # refused: another network (even one with the same tensor shapes), another noise schedule, another kind
    for key, value, match in (
        (("networks", "unet", "norm_num_groups"), 4, "norm_num_groups"),
        (("scheduler", "prediction_type"), "v_prediction", "prediction_type"),
        (("kind",), "segmentation", "ddpm model"),
    ):
        other = yaml.safe_load(yaml.safe_dump(cfg))
        where = other
        for k in key[:-1]:
            where = where[k]
        where[key[-1]] = value
        other_cfg = load_config(_write(tmp_path / "other.yaml", other))
        other_net = build_network("unet", other_cfg["networks"]["unet"])
        with pytest.raises(MeddiffError, match=match):
            _init_from(tmp_path / "a", other_net, EMA(other_net, 0.9), other_cfg)
    # a budget the run it starts from has already spent trains nothing: refused, not exported unchanged
    with pytest.raises(MeddiffError, match="already at step 2"):
        train(path, out=tmp_path / "c", work_dir=tmp_path / "run3", steps=2, progress=False)
    assert not (tmp_path / "c").exists()
    missing = yaml.safe_load(yaml.safe_dump(cfg))
    missing["training"]["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(MeddiffError, match="does not exist"):
        train(
            _write(tmp_path / "missing.yaml", missing), out=tmp_path / "d", work_dir=tmp_path / "run4", progress=False
        )
    (tmp_path / "a" / "unet.safetensors").write_bytes(b"not weights")
    with pytest.raises(MeddiffError, match="corrupt"):
        _init_from(tmp_path / "a", net, EMA(net, 0.9), loaded)
    with pytest.raises(MeddiffError, match="model.json"):
        _init_from(tmp_path, net, EMA(net, 0.9), loaded)


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_are_valid(path):
    from napari_meddiff.training.config import validate

    raw = yaml.safe_load(path.read_text())
    raw["data"]["dir"] = "."
    cfg = validate(raw)
    assert cfg["name"] == path.stem and cfg["kind"] in ("ddpm", "ldm", "segmentation")


def test_a_label_map_model_trains_on_maps_with_their_lesions_and_generates_from_one(tmp_path):
    """A ddpm with ``label_map``: each subject's tissue map with its lesion mask painted in (label 4) is the
    condition; the exported folder declares the labels and generates a scan on a given map's grid."""
    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.data import load_dataset
    from napari_meddiff.training.pipeline import train

    cohort = tmp_path / "cohort"
    write_cohort(cohort, 3, seed=0, lesion_fraction=1.0, progress=False)
    path = tiny_config(tmp_path, cohort, "ddpm", 3)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(lesion_replace=["_T1w", "_lesion"], lesion_label=4)
    cfg["label_map"] = {"labels": {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}}
    cfg["networks"]["unet"]["space_to_depth"] = 2
    cfg["image_shape"] = [32, 32, 32]
    cfg["voxel_size"] = [6.0, 6.0, 6.0]
    path.write_text(yaml.safe_dump(cfg))
    data = load_dataset(load_config(path), progress=False)
    assert data.labels is not None and data.labels.shape == (3, 32, 32, 32)
    assert all(4 in item.unique() for item in data.labels)  # every subject has a lesion here
    out = train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False)
    model = load_model(out)
    assert model.label_map == {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}
    assert model.config["networks"]["unet"]["in_channels"] == 6
    dseg = read_volume(cohort / "sub-000000_dseg.nii.gz")
    (vol,) = generate(model, [0], steps=2, device="cpu", labels=dseg)
    assert vol.shape == dseg.shape and np.allclose(vol.affine, dseg.affine)
    with pytest.raises(MeddiffError, match="label_map.labels must name every value"):
        bad = dict(cfg, label_map={"labels": {0: "background", 2: "GM"}})
        path.write_text(yaml.safe_dump(bad))
        load_config(path)


def test_a_map_generator_trains_on_the_maps_and_generates_maps_under_its_conditions(tmp_path):
    """A ddpm with ``label_output`` denoises each subject's one-hot tissue map (lesion painted in as label 4),
    conditioned on volumes measured from those maps; the exported folder generates label maps."""
    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.pipeline import train

    cohort = tmp_path / "cohort"
    write_cohort(cohort, 3, seed=0, lesion_fraction=1.0, progress=False)
    path = tiny_config(tmp_path, cohort, "ddpm", 3)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(lesion_replace=["_T1w", "_lesion"], lesion_label=4)
    cfg["label_output"] = {"labels": {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}}
    cfg["conditioning"] = {"input": "concat", "conditions": ["brain_volume", "csf_volume"]}
    cfg["networks"]["unet"]["space_to_depth"] = 2
    cfg["image_shape"] = [32, 32, 32]
    cfg["voxel_size"] = [6.0, 6.0, 6.0]
    path.write_text(yaml.safe_dump(cfg))
    unet = load_config(path)["networks"]["unet"]
    assert (unet["in_channels"], unet["out_channels"]) == (5 + 2, 5)  # the map's channels and two conditions
    out = train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False)
    model = load_model(out)
    assert model.label_output == {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"} and not model.label_map
    assert [c.name for c in model.conditions] == ["brain_volume", "csf_volume"]
    (vol,) = generate(model, [0], steps=2, device="cpu", conditions={"brain_volume": 0.2})
    assert vol.shape == (32, 32, 32) and vol.array.dtype == np.uint8 and vol.array.max() <= 4
    assert vol.metadata["provenance"]["conditions"]["brain_volume"] == 0.2


@pytest.mark.parametrize("layout", ["channels_last_3d", "auto"])
def test_3d_diffusion_trains_in_a_memory_layout_and_exports_a_plain_model(tmp_path, cohort, layout, caplog):
    """A 3D pixel model trains in the layout asked for (``auto``: measured, and the times logged); the
    checkpoint records it and the exported weights load and sample in PyTorch's plain layout."""
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.pipeline import train

    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "ddpm", 3).read_text())
    cfg["training"]["memory_format"] = layout
    path = tmp_path / "layout.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with caplog.at_level("INFO", logger="napari_meddiff.training.diffusion"):
        out = train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False)
    recorded = load_checkpoint(tmp_path / "run" / "diffusion.pt")["memory_format"]
    assert recorded == layout if layout != "auto" else recorded in ("contiguous", "channels_last_3d")
    if layout == "auto":
        assert "contiguous" in caplog.text and "channels_last_3d" in caplog.text and "s/step" in caplog.text
    model = load_model(out)
    assert all(p.is_contiguous() for p in model.unet.parameters())
    (vol,) = generate(model, [0], steps=2, device="cpu")
    assert vol.array.shape == tuple(model.image_shape) and np.isfinite(vol.array).all()


def test_whole_image_steps_take_their_own_batch_size(tmp_path, cohort, monkeypatch):
    """Crops for ``patch_steps`` at ``batch_size``, then whole images at ``whole_batch_size`` (a whole 3D volume
    costs many crops: the same batch would make those steps many times slower)."""
    from napari_meddiff.training import diffusion
    from napari_meddiff.training.pipeline import train

    drawn = []

    def recording(data, labels, batch_size, *args, **kwargs):
        drawn.append(batch_size)
        return original(data, labels, batch_size, *args, **kwargs)

    original = diffusion.random_batch
    monkeypatch.setattr(diffusion, "random_batch", recording)
    cfg = yaml.safe_load(tiny_config(tmp_path, cohort, "ddpm").read_text())
    cfg["training"].update(steps=4, batch_size=3, patch_size=[8, 8], patch_steps=2, whole_batch_size=1)
    path = tmp_path / "whole.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(path, out=tmp_path / "model", work_dir=tmp_path / "run", progress=False)
    assert drawn == [3, 3, 1, 1]
    cfg["training"]["whole_batch_size"] = 0
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MeddiffError, match="whole_batch_size"):
        train(path, out=tmp_path / "model2", work_dir=tmp_path / "run2", progress=False)
