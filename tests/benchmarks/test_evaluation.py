"""The evaluation instruments of benchmarks/ (the two-sample tests of evaluate_models.py, evaluate_conditioning's
tissue volumes, psnr_ceiling, plot_ae_curve, evaluate_ae's latent statistics), on inputs whose answer is known.

The scripts import each other as top-level modules (``from common import ...``); pytest puts ``benchmarks/`` on
``sys.path`` for the tests too (``pythonpath`` in pyproject.toml), so they are imported here as they import
each other."""

import evaluate_models
import torch


def _blobs(n: int, seed: int, sharp: bool) -> torch.Tensor:
    """Random bright discs on a dark background; ``sharp=False`` blurs them (what an undertrained model draws)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = 4 + 8 * torch.rand(n, 2, generator=g)
    radius = 2 + 3 * torch.rand(n, generator=g)
    d = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    img = torch.sigmoid((radius[:, None, None] - d) * (4.0 if sharp else 0.6))
    return (img + 0.02 * torch.randn(img.shape, generator=g)).unsqueeze(1)


def test_two_sample_test_tells_blur_apart_and_not_a_second_draw():
    real = _blobs(120, 0, sharp=True)
    same = evaluate_models.c2st(real, _blobs(120, 1, sharp=True), min_steps=150)
    blurred = evaluate_models.c2st(real, _blobs(120, 2, sharp=False), min_steps=150)
    assert blurred["accuracy"] >= 0.9, blurred
    assert same["accuracy"] <= 0.65, same
    assert same["n_per_class"] == 120 and len(same["folds"]) == 2 and not blurred["degenerate"]


def test_a_candidate_folder_keeps_its_results_out_of_the_shipped_files(tmp_path):
    from napari_meddiff.testing.tiny_models import make_tiny_model

    candidate = make_tiny_model(tmp_path / "run" / "model", kind="ddpm", spatial_dims=2)
    assert evaluate_models.is_candidate(candidate)
    assert evaluate_models.results_path(str(candidate), None) == candidate / "evaluation.json"
    assert evaluate_models.results_path("brain-ddpm-2d", None) == evaluate_models.RESULTS / "evaluation.json"
    assert not evaluate_models.is_candidate(evaluate_models.ROOT / "models" / "brain-ddpm-2d")
    chosen = tmp_path / "elsewhere.json"
    assert evaluate_models.results_path(str(candidate), chosen) == chosen


def test_conditioning_instrument_measures_known_tissue_volumes():
    """evaluate_conditioning's k-means tissue volumes on a phantom: nested shells of CSF / grey / white intensity."""
    import evaluate_conditioning
    import numpy as np

    g = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    r = np.sqrt((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2)
    for inner in (8.0, 11.0):  # two phantoms: more brain, less CSF in the second
        img = np.where(r < inner, 0.9, np.where(r < inner + 4, 0.65, np.where(r < 16, 0.35, 0.0)))
        img = img + 0.02 * g.standard_normal(img.shape)
        got = evaluate_conditioning.tissue_volumes(img, voxel_ml=0.008)
        brain = float((r < inner + 4).sum()) * 0.008
        csf = float(((r >= inner + 4) & (r < 16)).sum()) * 0.008
        assert abs(got["brain_ml"] - brain) < 0.02 * brain and abs(got["csf_ml"] - csf) < 0.05 * csf, (got, brain, csf)
    assert evaluate_conditioning.pearson([1, 2, 3], [2, 4, 6.5]) > 0.99


def test_psnr_ceiling_is_the_noise_variance_of_a_real_subject():
    """The noise ceiling of benchmarks/psnr_ceiling.py: its closed-form Rician variance against scipy's, and on
    a cohort subject a ceiling above what a perfect denoiser (the noise-free image) reaches."""
    import numpy as np
    import psnr_ceiling
    from scipy import stats

    a = np.array([0.0, 0.3, 1.0, 4.0, 20.0])
    expected = [2 - np.pi / 2] + [stats.rice(b=v).var() for v in a[1:]]
    np.testing.assert_allclose(psnr_ceiling.rician_variance(a, 1.0), expected, rtol=1e-6)
    cfg = {
        "voxel_size": [2.0, 2.0, 2.0],
        "image_shape": [96, 112, 96],
        "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5, "foreground_only": True},
        "data": {},
    }
    row = psnr_ceiling.subject_ceiling(100001, cfg)  # seed 100001: noise sd ~0.9 % of the window
    assert 0.003 < row["noise_sd"] < 0.03
    assert 30 < row["psnr_clean_db"] < row["ceiling_db"] < 60


def test_ae_curve_plot_takes_the_last_heldout_line_per_step(tmp_path):
    import json

    import plot_ae_curve

    curve = {"step": 30, "minutes": 2.0, "l1": [[10, 0.3], [20, 0.2], [30, 0.1]], "val_psnr_db": [[20, 21.0]]}
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    lines = [
        {"step": 10, "ema": {"psnr_db": {"mean": 18.0, "sd": 1.0}}},
        {"step": 10},  # no EMA yet: skipped
        {"step": 30, "ema": {"psnr_db": {"mean": 20.0, "sd": 1.0}}},
        {"step": 30, "ema": {"psnr_db": {"mean": 22.5, "sd": 0.5}}},
    ]  # evaluated again: the last counts
    (tmp_path / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert plot_ae_curve.heldout_points(tmp_path / "heldout.jsonl") == [(10, 18.0, 1.0), (30, 22.5, 0.5)]
    out = tmp_path / "curve.png"
    (tmp_path / "train.yaml").write_text("autoencoder_training: {patch_steps: 20}\n")
    assert (
        plot_ae_curve.main(
            [
                "--curve",
                str(tmp_path / "curve.json"),
                "--heldout",
                str(tmp_path / "heldout.jsonl"),
                "--config",
                str(tmp_path / "train.yaml"),
                "--ceiling",
                str(tmp_path / "none.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(out).size[0] > 500


def test_latent_stats_tell_a_collapsed_channel_from_an_informative_one():
    """`evaluate_ae.latent_stats`: a channel whose sigma is 1 and whose mean is constant is all noise (share 1);
    one with a tiny sigma is all signal (share near 0)."""
    import evaluate_ae

    from napari_meddiff.models import build_network

    torch.manual_seed(0)
    ae = build_network(
        "autoencoder",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [8, 8],
            "latent_channels": 2,
            "num_res_blocks": [1, 1],
            "attention_levels": [False, False],
            "norm_num_groups": 8,
            "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
        },
    )
    with torch.no_grad():
        ae.quant_conv_mu.conv.weight[1] = 0  # channel 1: mean 0 everywhere ...
        ae.quant_conv_mu.conv.bias[1] = 0
        ae.quant_conv_log_sigma.conv.weight.zero_()  # ... and sigma exp(0 / 2) = 1: the prior
        ae.quant_conv_log_sigma.conv.bias[:] = torch.tensor([-20.0, 0.0])  # channel 0: sigma exp(-10)
    real = torch.rand(3, 1, 16, 16, 16)
    stats = evaluate_ae.latent_stats(ae, real)
    informative, collapsed = stats["channels"]
    assert collapsed["noise_share"] == 1.0 and collapsed["mean_sd"] == 0.0
    assert abs(collapsed["sigma_mean"] - 1.0) < 1e-4
    assert informative["noise_share"] < 1e-6 and informative["mean_sd"] > 0
    assert 0.4 < stats["noise_share_all"] < 1.0
    assert stats["psnr_db_from_mean"] > 0 and stats["psnr_db_from_draw"] > 0


def _balls(n: int, seed: int, sharp: bool) -> torch.Tensor:
    """3D: random bright balls in 20x24x20 volumes, blurred when not ``sharp``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(24.0), torch.arange(20.0), indexing="ij"))
    centre = torch.tensor([10.0, 12.0, 10.0]) + 2 * torch.randn(n, 3, generator=g)
    radius = 5 + 2 * torch.rand(n, generator=g)
    d = ((grid[None] - centre[:, :, None, None, None]) ** 2).sum(1).sqrt()
    img = torch.sigmoid((radius[:, None, None, None] - d) * (4.0 if sharp else 0.7))
    return (img + 0.02 * torch.randn(img.shape, generator=g)).unsqueeze(1)


def test_slice_two_sample_test_tells_blurred_volumes_apart_with_few_volumes():
    real = _balls(24, 0, sharp=True)
    blurred = evaluate_models.c2st_slices(real, _balls(24, 2, sharp=False), steps=150, per_volume=8)
    same = evaluate_models.c2st_slices(real, _balls(24, 1, sharp=True), steps=150, per_volume=8)
    assert blurred["accuracy"] >= 0.9 and not blurred["degenerate"], blurred
    assert same["accuracy"] <= 0.7, same
    assert blurred["n_per_class"] == 24 and blurred["test_per_fold"] == 24
    assert evaluate_models.axial_slices(real, 8).shape == (24, 8, 1, 20, 24)
