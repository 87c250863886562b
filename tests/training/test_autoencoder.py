"""Autoencoder training: a run stopped and resumed ends bit-identical to one run straight through (step
counter, weights, EMA, Adam moments, data and sampling RNG), across the switch from crops to whole volumes
and in either memory layout; ``memory_format: auto`` picks a layout by measurement; the loss/PSNR curve
is written next to the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.training.autoencoder import crop_schedule, train_autoencoder
from napari_meddiff.training.checkpoints import TRAINER_STATE, load_checkpoint, save_checkpoint, slim_checkpoint
from napari_meddiff.training.config import validate
from napari_meddiff.training.data import split_dataset
from napari_meddiff.training.device_setup import LAYOUTS, processor_identity
from napari_meddiff.training.distributed import Dist

TINY_AE = {
    "channels": [8, 8],
    "latent_channels": 2,
    "num_res_blocks": [1, 1],
    "attention_levels": [False, False],
    "norm_num_groups": 8,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from napari_meddiff.data.mni152 import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=0, progress=False)
    cfg = config(out, "contiguous")
    train, val = split_dataset(cfg, progress=False)
    return out, train.images, val.images


def config(folder, layout: str, **ae_training) -> dict:
    return validate(
        {
            "name": "t-ae",
            "kind": "ldm",
            "spatial_dims": 3,
            "image_shape": [16, 16, 16],
            "voxel_size": [10.0] * 3,
            "data": {"dir": str(folder), "val_subjects": 1},
            "networks": {
                "unet": {
                    "channels": [8, 16],
                    "attention_levels": [False, False],
                    "num_res_blocks": 1,
                    "num_head_channels": 8,
                    "norm_num_groups": 8,
                },
                "autoencoder": dict(TINY_AE),
            },
            "autoencoder_training": {
                "steps": 4,
                "batch_size": 2,
                "patch_size": [12, 12, 12],
                "patch_steps": 3,
                "precision": "fp32",
                "memory_format": layout,
                "ema_decay": 0.9,
                "ema_start": 1,
                "adv_weight": 0.01,
                "adv_warmup_steps": 2,
                "val_every": 2,
                "log_every": 1,
                "checkpoint_minutes": 100,
                **ae_training,
            },
        }
    )


def run(cfg, images, val, work, resume=False):
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    return train_autoencoder(
        cfg, images, val, work_dir=work, device=dev, dist=Dist(dev), resume=resume, max_minutes=None
    )


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_resumed_run_equals_straight_run(tmp_path, data, layout):
    folder, images, val = data
    run(config(folder, layout), images, val, tmp_path / "straight")
    run(config(folder, layout, steps=2), images, val, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "autoencoder.pt")["step"] == 2
    ae, summary = run(config(folder, layout), images, val, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "autoencoder.pt")
    b = load_checkpoint(tmp_path / "resumed" / "autoencoder.pt")
    assert a["step"] == b["step"] == summary["steps"] == 4
    assert b["memory_format"] == layout and b["ema"] is not None
    for key in ("model", "ema", "discriminator", "optimizer", "optimizer_d", "rng", "history", "val_psnr"):
        assert same_tensors(a[key], b[key]), key
    assert {float(s["step"]) for s in b["optimizer"]["state"].values()} == {4.0}
    assert not same_tensors(b["model"], b["ema"])  # the EMA is its own average, not a copy
    # the returned network is the EMA, contiguous (safetensors export needs contiguous tensors)
    state = ae.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    assert same_tensors({k: v.contiguous() for k, v in b["ema"].items()}, state)
    curve = json.loads((tmp_path / "resumed" / "autoencoder_curve.json").read_text())
    assert curve["step"] == 4 and [s for s, _ in curve["l1"]] == [1, 2, 3, 4]
    assert [s for s, _ in curve["val_psnr_db"]] == [2, 4] and all(p > 5 for _, p in curve["val_psnr_db"])


def test_auto_layout_is_measured(tmp_path, data, caplog):
    folder, images, _ = data
    with caplog.at_level("INFO", logger="napari_meddiff.training.autoencoder"):
        run(config(folder, "auto", steps=1, val_every=0), images, None, tmp_path / "w")
    chosen = load_checkpoint(tmp_path / "w" / "autoencoder.pt")["memory_format"]
    assert chosen in LAYOUTS
    assert "contiguous" in caplog.text and "channels_last_3d" in caplog.text and "s/step" in caplog.text


def test_bad_layout_is_a_user_error(tmp_path, data):
    folder, images, _ = data
    with pytest.raises(MeddiffError, match="memory_format"):
        run(config(folder, "nhwc", steps=1), images, None, tmp_path / "w")


def test_crops_then_whole_volumes():
    tc = {"patch_size": [8, 8, 8], "patch_steps": 3}
    assert [crop_schedule(tc, s) for s in (0, 2, 3, 10)] == [[8, 8, 8], [8, 8, 8], None, None]
    assert crop_schedule({"patch_size": [8, 8, 8], "patch_steps": None}, 10**6) == [8, 8, 8]
    assert crop_schedule({"patch_size": None, "patch_steps": 3}, 0) is None


def test_auto_layout_is_not_measured_again_on_resume(tmp_path, data, caplog):
    folder, images, _ = data
    run(config(folder, "channels_last_3d", steps=1, val_every=0), images, None, tmp_path / "w")
    with caplog.at_level("INFO", logger="napari_meddiff.training.autoencoder"):
        run(config(folder, "auto", steps=2, val_every=0), images, None, tmp_path / "w", resume=True)
    assert load_checkpoint(tmp_path / "w" / "autoencoder.pt")["memory_format"] == "channels_last_3d"
    assert "s/step" not in caplog.text  # the run's own layout, kept, not a new measurement


def test_auto_layout_is_measured_again_on_another_processor(tmp_path, data, caplog):
    folder, images, _ = data
    run(config(folder, "channels_last_3d", steps=1, val_every=0), images, None, tmp_path / "w")
    path = tmp_path / "w" / "autoencoder.pt"
    state = load_checkpoint(path)
    assert state["processor"] == processor_identity(torch.device("cpu"))
    state["processor"] = "another CPU, native bf16: False"  # as if the run had started on another machine
    save_checkpoint(path, state)
    with caplog.at_level("INFO", logger="napari_meddiff.training.autoencoder"):
        run(config(folder, "auto", steps=2, val_every=0), images, None, tmp_path / "w", resume=True)
    assert "measuring the layout again" in caplog.text and "s/step" in caplog.text


def test_slim_checkpoint_resumes_from_the_ema_with_a_fresh_adam(tmp_path, data, caplog):
    """What a GPU run is carried: the EMA weights and the counters, not the optimiser (a quarter of the size)."""
    folder, images, val = data
    run(config(folder, "contiguous", steps=2), images, val, tmp_path / "cpu")
    full = tmp_path / "cpu" / "autoencoder.pt"
    slim_path = tmp_path / "gpu" / "autoencoder.pt"
    slim_checkpoint(full, slim_path)
    slim, st = load_checkpoint(slim_path), load_checkpoint(full)
    assert slim["slim"] and not set(TRAINER_STATE) & set(slim)
    assert same_tensors(slim["model"], st["ema"]) and same_tensors(slim["ema"], st["ema"])
    assert slim["step"] == 2 and slim["history"] == st["history"] and same_tensors(slim["rng"], st["rng"])
    ae_bytes = sum(v.numel() * v.element_size() for v in st["ema"].values())
    # the EMA stored once (not model + EMA), no Adam moments (two more copies)
    assert full.stat().st_size - slim_path.stat().st_size > 2.5 * ae_bytes

    with caplog.at_level("INFO", logger="napari_meddiff.training.checkpoints"):
        _, summary = run(config(folder, "contiguous"), images, val, tmp_path / "gpu", resume=True)
    assert "Adam and the LR warm-up start afresh" in caplog.text
    after = load_checkpoint(slim_path)
    assert summary["steps"] == after["step"] == 4 and "slim" not in after  # a full checkpoint again
    assert {float(s["step"]) for s in after["optimizer"]["state"].values()} == {2.0}  # Adam restarted at step 2
    assert not same_tensors(after["model"], st["ema"])  # it trained on


def test_slim_checkpoint_needs_an_ema(tmp_path, data):
    folder, images, val = data
    run(config(folder, "contiguous", steps=1, ema_decay=0.0), images, val, tmp_path / "w")
    with pytest.raises(MeddiffError, match="no EMA"):
        slim_checkpoint(tmp_path / "w" / "autoencoder.pt", tmp_path / "slim.pt")


def test_freeze_encoder_trains_the_decoder_and_keeps_the_latents(tmp_path, data):
    """Decoder-only training (``freeze_encoder``) resumed from a whole-AE run: the encoder, live and EMA, ends
    as the earlier run's EMA encoder bit for bit, so the latents (and their cache key) do not change, while
    the decoder does."""
    from napari_meddiff.training.autoencoder import encoder_sha256, encoder_state

    folder, images, val = data
    work = tmp_path / "run"
    ae_before, before = run(config(folder, "contiguous"), images, val, work)
    ckpt = load_checkpoint(work / "autoencoder.pt")
    assert not same_tensors(ckpt["model"], ckpt["ema"])  # the live encoder is not the EMA's yet
    ae_after, after = run(config(folder, "contiguous", steps=7, freeze_encoder=True), images, val, work, resume=True)
    assert after["steps"] == 7 and after["freeze_encoder"] and not before["freeze_encoder"]
    assert before["encoder_sha256"] == after["encoder_sha256"] == encoder_sha256(ae_before)
    st = load_checkpoint(work / "autoencoder.pt")
    enc = encoder_state(ae_before)
    assert enc and all(torch.equal(st["model"][k], v) and torch.equal(st["ema"][k], v) for k, v in enc.items())
    assert any(not torch.equal(st["ema"][k], ckpt["ema"][k]) for k in st["ema"] if k.startswith("decoder."))
    x = images[:1]
    with torch.no_grad():
        (mu_a, sigma_a), (mu_b, sigma_b) = ae_before.encode(x), ae_after.encode(x)
        assert torch.equal(mu_a, mu_b) and torch.equal(sigma_a, sigma_b)
        assert not torch.equal(ae_before.decode(mu_a), ae_after.decode(mu_a))


def test_freeze_encoder_must_be_a_boolean(tmp_path, data):
    with pytest.raises(MeddiffError, match="freeze_encoder"):
        config(data[0], "contiguous", freeze_encoder="yes")
