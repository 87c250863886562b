"""Exact tiled autoencoder passes equal the whole-volume pass (napari_meddiff/autoencoder/tiling.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL

from napari_meddiff import MeddiffError, generate, load_model
from napari_meddiff.autoencoder.passes import autoencoder_pass, decode_latents, encode_images
from napari_meddiff.autoencoder.tiling import tiled_decode, tiled_encode
from napari_meddiff.choices import AUTOENCODER_PASS_ENV


def _autoencoder(dims: int, seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = dict(
        spatial_dims=dims,
        channels=(8, 16, 16),
        latent_channels=3,
        num_res_blocks=(1, 2, 1),
        norm_num_groups=4,
        attention_levels=(False,) * 3,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    return AutoencoderKL(**{**config, **kw}).eval()


@pytest.mark.parametrize("dims,latent,tiles", [(3, (5, 7, 6), (10, 64)), (2, (9, 13), (5, 512))])
def test_tiled_decode_equals_whole_decode(dims, latent, tiles):
    ae = _autoencoder(dims)
    z = torch.randn((2, 3, *latent), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = ae.decode_stage_2_outputs(z)
        for tile in tiles:
            tiled = tiled_decode(ae, z, tile=tile)
            assert tiled.shape == whole.shape == (2, 1, *(4 * n for n in latent))
            assert (tiled - whole).abs().max() <= 1e-4, tile


@pytest.mark.parametrize("dims,shape", [(3, (17, 22, 13)), (2, (37, 29))])
def test_tiled_encode_equals_whole_encode(dims, shape):
    ae = _autoencoder(dims, seed=2)
    x = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        mu, sigma = ae.encode(x)
        for tile in (4, 7):
            t_mu, t_sigma = tiled_encode(ae, x, tile=tile)
            assert t_mu.shape == mu.shape
            assert (t_mu - mu).abs().max() <= 1e-4 and (t_sigma - sigma).abs().max() <= 1e-4


def test_tiled_maisi_autoencoder_equals_whole():
    """MAISI's autoencoder: its own GroupNorm (float32 per group) and trilinear upsampling."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(4)
    ae = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        num_channels=[8, 16, 16],
        num_res_blocks=[2, 2, 2],
        norm_num_groups=4,
        attention_levels=[False] * 3,
        num_splits=1,
        dim_split=1,
    ).eval()
    z = torch.randn((1, 4, 5, 7, 6), generator=torch.Generator().manual_seed(5))
    x = torch.rand((1, 1, 21, 26, 23), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        assert (tiled_decode(ae, z, tile=5) - ae.decode_stage_2_outputs(z)).abs().max() <= 1e-4
        assert (tiled_encode(ae, x, tile=6)[0] - ae.encode(x)[0]).abs().max() <= 1e-4


def test_tiled_decode_in_bf16_is_within_bf16_rounding():
    ae = _autoencoder(3, seed=7)
    z = torch.randn((1, 3, 6, 5, 7), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = ae.decode_stage_2_outputs(z).float()
        tiled = tiled_decode(ae, z, tile=8).float()
    scale = float(whole.max() - whole.min())  # the criterion is on [0, 1] intensities
    assert (tiled - whole).abs().max() / scale <= 1e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_tiles_equal_the_whole_pass_for_any_thread_count(monkeypatch, tmp_path, precision):
    """The channels-last path of `load_model` on bf16 CPUs: normalised slabs written into a reused, zero-bordered
    workspace and identity residuals added from the store in place; equal to the whole pass to rounding, and the
    same bits with 1 and 2 threads (the widget leaves a core to the GUI)."""
    from napari_meddiff.autoencoder import tiling
    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn
    from napari_meddiff.runtime.precision import autocast_context

    slabs = []
    normalised = tiling._normalised_input
    monkeypatch.setattr(tiling, "_normalised_input", lambda *a: slabs.append(1) or normalised(*a))
    ae = prefer_channels_last(prefer_onednn(_autoencoder(3, seed=13)))
    z = torch.randn((1, 3, 5, 7, 6), generator=torch.Generator().manual_seed(14))
    threads = torch.get_num_threads()
    with torch.inference_mode(), autocast_context(z.device, precision):
        whole = ae.decode_stage_2_outputs(z).float()
        scale = float(whole.max() - whole.min())
        monkeypatch.setenv("MEDDIFF_TILE_DIR", str(tmp_path))
        for tile, ram_bytes in ((5, None), (8, None), (64, None), (5, 0)):  # one-sided and two-sided borders, one
            tiled = tiled_decode(ae, z, tile=tile, ram_bytes=ram_bytes).float()  # tile for all, stores in files
            assert (tiled - whole).abs().max() / scale <= (1e-4 if precision == "fp32" else 1e-2), tile
        try:
            torch.set_num_threads(1)
            one = tiled_decode(ae, z, tile=5)
            torch.set_num_threads(2)
            two = tiled_decode(ae, z, tile=5)
        finally:
            torch.set_num_threads(threads)
    assert slabs and torch.equal(one, two)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_ram_and_file_stores_give_the_same_bits(tmp_path, monkeypatch, precision):
    """Whether stores spill to files depends on free memory: it must not change a single bit. Trained norms
    (not MONAI's initial weight 1, bias 0), where a strided and a dense normalisation kernel round differently."""
    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn
    from napari_meddiff.runtime.precision import autocast_context

    monkeypatch.setenv("MEDDIFF_TILE_DIR", str(tmp_path))
    ae = _autoencoder(3, seed=17)
    generator = torch.Generator().manual_seed(18)
    with torch.no_grad():
        for norm in (m for m in ae.modules() if isinstance(m, torch.nn.GroupNorm)):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    prefer_channels_last(prefer_onednn(ae))
    z = torch.randn((1, 3, 5, 6, 4), generator=torch.Generator().manual_seed(19))
    with torch.inference_mode(), autocast_context(z.device, precision):
        in_ram = tiled_decode(ae, z, tile=7)
        in_files = tiled_decode(ae, z, tile=7, ram_bytes=0)
    assert torch.equal(in_ram, in_files)
    assert list(tmp_path.iterdir()) == []


def test_channels_last_maisi_ram_and_file_stores_give_the_same_bits(tmp_path, monkeypatch):
    """MAISI's trilinear upsampling picks its kernel by strides: a tile read from a file has a RAM tile's."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn

    monkeypatch.setenv("MEDDIFF_TILE_DIR", str(tmp_path))
    torch.manual_seed(3)
    ae = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        num_channels=[8, 16, 16],
        num_res_blocks=[2, 2, 2],
        norm_num_groups=4,
        attention_levels=[False] * 3,
        num_splits=1,
        dim_split=1,
    ).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for norm in (m for m in ae.modules() if isinstance(m, torch.nn.GroupNorm)):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.rand(norm.bias.shape, generator=generator) * 0.6 - 0.3)
    prefer_channels_last(prefer_onednn(ae))
    z = torch.randn((1, 4, 5, 4, 3), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for tile in (3, 7):
            assert torch.equal(tiled_decode(ae, z, tile=tile), tiled_decode(ae, z, tile=tile, ram_bytes=0)), tile
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_stats_are_exact_and_thread_invariant(dtype, channels_last):
    """Per-channel mean and centred sum of squares of a tile of many chunks, against float64; the same bits with 1
    and 2 threads; float32 sums under bf16 autocast too; the tile untouched."""
    from napari_meddiff.runtime.cpu_kernels import channel_stats

    tile = (3 * torch.randn(1, 2048, 16, 16, 16, generator=torch.Generator().manual_seed(20)) + 5).to(dtype)
    if channels_last:
        tile = tile.contiguous(memory_format=torch.channels_last_3d)
    before = tile.clone()
    reference = tile[0].double().reshape(2048, -1)
    mean = reference.mean(1)
    m2 = (reference - mean[:, None]).square().sum(1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results.append(channel_stats(tile, channels_last))
    finally:
        torch.set_num_threads(threads)
    (got_mean, got_m2, count), again = results
    assert count == 16**3 and torch.equal(got_mean, again[0]) and torch.equal(got_m2, again[1])
    assert (got_mean - mean).abs().max() <= 1e-5 and ((got_m2 - m2) / m2).abs().max() <= 1e-5
    assert torch.equal(tile, before)


def test_channels_last_maisi_norm_changes_the_workspace_dtype():
    """MAISI's GroupNorm returns float32 from bf16 activations: the workspace follows the normalised dtype."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn

    torch.manual_seed(15)
    ae = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        num_channels=[8, 16, 16],
        num_res_blocks=[1, 1, 1],
        norm_num_groups=4,
        attention_levels=[False] * 3,
        num_splits=1,
        dim_split=1,
        norm_float16=False,
    ).eval()
    prefer_channels_last(prefer_onednn(ae))
    z = torch.randn((1, 4, 4, 5, 6), generator=torch.Generator().manual_seed(16))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = ae.decode_stage_2_outputs(z).float()
        tiled = tiled_decode(ae, z, tile=6).float()
    assert (tiled - whole).abs().max() / float(whole.max() - whole.min()) <= 1e-2


def test_file_stores_give_the_same_result_and_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_TILE_DIR", str(tmp_path))
    ae = _autoencoder(3, seed=9)
    z = torch.randn((1, 3, 4, 5, 6), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        in_ram = tiled_decode(ae, z, tile=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations are stored as their bits
            in_ram_bf16 = tiled_decode(ae, z, tile=8)
            in_files_bf16 = tiled_decode(ae, z, tile=8, ram_bytes=0)
        in_files = tiled_decode(ae, z, tile=8, ram_bytes=0)  # every activation in a file
    assert torch.equal(in_ram, in_files) and torch.equal(in_ram_bf16, in_files_bf16)
    assert list(tmp_path.iterdir()) == []


def test_residual_blocks_write_over_their_input_and_the_estimate_is_the_peak(monkeypatch):
    from napari_meddiff.autoencoder import tiling

    ae = _autoencoder(3, seed=11)
    z = torch.randn((1, 3, 5, 4, 6), generator=torch.Generator().manual_seed(12))
    peaks, new = [], tiling._Stores.new

    def recording_new(self, *args):
        store = new(self, *args)
        peaks.append(self.ram_in_use())
        return store

    monkeypatch.setattr(tiling._Stores, "new", recording_new)
    with torch.inference_mode():
        tiled = tiled_decode(ae, z, tile=7)
        whole = ae.decode_stage_2_outputs(z)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)
    steps = tiling.decoder_steps(ae)[0]
    assert max(peaks) == tiling.tiled_store_bytes(steps, z.shape[2:])
    reuses = [s for i, s in enumerate(steps) if s.residual and s.shortcut is None]
    sides = [s for s in steps if s.side is not None]  # a channel-changing block's shortcut: a store of its own
    assert reuses and sides and len(peaks) == len(steps) + 1 - len(reuses) + len(sides)  # no new store for outputs


def test_attention_is_refused_with_a_clear_message(monkeypatch):
    ae = _autoencoder(3, with_decoder_nonlocal_attn=True)
    z = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(MeddiffError, match="attention"):
        tiled_decode(ae, z)
    monkeypatch.setattr("napari_meddiff.autoencoder.passes.free_memory_bytes", lambda device: 0)
    assert autoencoder_pass(types.SimpleNamespace(autoencoder=ae), z) == "whole"  # auto: the only pass there is


def test_latent_model_tiled_is_reproducible_and_equals_whole(tiny_models, monkeypatch):
    model = load_model(tiny_models["ldm3d"])
    z = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(11))
    whole = decode_latents(model, z, mode="whole")
    tiled = decode_latents(model, z, mode="tiled", tile=5)
    assert torch.equal(tiled, decode_latents(model, z, mode="tiled", tile=5))  # bitwise, run to run
    assert (tiled - whole).abs().max() <= 1e-4
    images = torch.rand((1, 1, *model.image_shape), generator=torch.Generator().manual_seed(12))
    mean = encode_images(model, images, sample=False, mode="whole")
    assert (encode_images(model, images, sample=False, mode="tiled", tile=6) - mean).abs().max() <= 1e-4
    draws = [
        encode_images(model, images, sample=True, generator=torch.Generator().manual_seed(s), mode="whole")
        for s in (5, 5, 6)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # seeded, not the global RNG
    assert not torch.equal(draws[0], mean)
    with pytest.raises(MeddiffError, match="generator"):
        encode_images(model, images, sample=True)
    with pytest.raises(MeddiffError, match="auto, whole, tiled"):
        decode_latents(model, z, mode="sliding")
    monkeypatch.setenv(AUTOENCODER_PASS_ENV, "tiled")  # the process default `--decode` sets
    (vol,) = generate(model, [3], steps=2)
    monkeypatch.setenv(AUTOENCODER_PASS_ENV, "whole")
    (ref,) = generate(model, [3], steps=2)
    np.testing.assert_allclose(vol.array, ref.array, atol=1e-4)
    assert not np.array_equal(vol.array, ref.array)  # the setting took effect: the two passes round differently
    assert (vol.metadata["provenance"]["autoencoder_pass"], ref.metadata["provenance"]["autoencoder_pass"]) == (
        "tiled",
        "whole",
    )


def test_cli_decode_option(models_env, tmp_path):
    env = {**__import__("os").environ, "MEDDIFF_MODELS": str(models_env)}
    arrays = {}
    for mode in ("whole", "tiled"):
        out = tmp_path / mode
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "napari_meddiff.cli",
                "generate",
                "--model",
                "tiny-ldm-3d",
                "--steps",
                "2",
                "--seed",
                "4",
                "--decode",
                mode,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        (path,) = out.glob("*.nii.gz")
        arrays[mode] = np.asarray(nib.load(path).dataobj)
    np.testing.assert_allclose(arrays["tiled"], arrays["whole"], atol=1e-4)
    assert not np.array_equal(arrays["tiled"], arrays["whole"])  # --decode took effect
    bad = subprocess.run(
        [sys.executable, "-m", "napari_meddiff.cli", "generate", "--decode", "sliding"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode != 0 and "--decode" in bad.stderr and "Traceback" not in bad.stderr


_PEAK_CHILD = textwrap.dedent("""
    import json, sys, torch
    from monai.networks.nets import AutoencoderKL
    from napari_meddiff.autoencoder.tiling import tiled_decode
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, channels=(32, 32), latent_channels=3, num_res_blocks=1, norm_num_groups=8,
                       attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                       with_decoder_nonlocal_attn=False).eval()
    z = torch.randn(1, 3, 40, 40, 40)
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    if sys.argv[1].startswith("ram"):  # channels-last stores in memory, as on a bf16 CPU
        from napari_meddiff.autoencoder import tiling
        from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn
        ae = AutoencoderKL(spatial_dims=3, channels=(16, 32), latent_channels=3, num_res_blocks=1, norm_num_groups=8,
                           attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                           with_decoder_nonlocal_attn=False).eval()
        prefer_channels_last(prefer_onednn(ae))
        if sys.argv[1] == "ram-kept":
            tiling.RamStore.release_below = lambda self, index: None
    def decode(z):
        if sys.argv[1] == "whole":
            return ae.decode_stage_2_outputs(z)
        return tiled_decode(ae, z, tile=24, ram_bytes=None if sys.argv[1].startswith("ram") else 0)
    with torch.inference_mode():
        decode(z[..., :8, :8, :8])  # libraries and kernels loaded before the peak is measured
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = status("VmRSS:")
        out = decode(z)
    print(json.dumps({"grew": status("VmHWM:") - before, "output": out.numel() * 4}))
""")


def test_tiled_decode_memory_is_bounded_by_the_tiles(tmp_path, monkeypatch):
    """Peak RSS of a subprocess: a whole 80^3 decode through 32-channel layers against a tiled one with every
    activation in a file (what stays in memory: the output and one tile's workspace)."""
    monkeypatch.setenv("MEDDIFF_TILE_DIR", str(tmp_path))
    grew = {}
    for mode in ("whole", "tiled"):
        proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        grew[mode] = json.loads(proc.stdout)
    whole, tiled = grew["whole"]["grew"], grew["tiled"]["grew"]
    activation = 32 * 80**3 * 4  # one full-resolution activation, 65 MB
    assert whole > 3 * activation
    assert tiled < activation + 2 * grew["tiled"]["output"], grew


def test_tiled_decode_gives_back_the_planes_it_has_read(monkeypatch):
    """Channels-last stores in memory release the planes no later tile reads (a channel-changing block's shortcut
    is computed beside its first convolution, so its input goes then): the same bits as with every store kept
    whole, and the peak RSS of a subprocess lower by most of the 32-channel upsampled activation (65 MB)."""
    from napari_meddiff.autoencoder import tiling
    from napari_meddiff.runtime import memory
    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn

    ae = prefer_channels_last(prefer_onednn(_autoencoder(3, seed=17)))
    z = torch.randn((1, 3, 8, 16, 16), generator=torch.Generator().manual_seed(18))
    released, real = [], memory.release_pages
    monkeypatch.setattr(memory, "release_pages", lambda address, length: released.append(real(address, length)))
    with torch.inference_mode():
        whole = ae.decode_stage_2_outputs(z)
        tiled = tiled_decode(ae, z, tile=8)
        monkeypatch.setattr(tiling.RamStore, "release_below", lambda self, index: None)
        kept = tiled_decode(ae, z, tile=8)
    assert sum(released) > 0 and torch.equal(tiled, kept)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)
    peaks = {}
    for mode in ("ram", "ram-kept"):
        proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        peaks[mode] = json.loads(proc.stdout)["grew"]
    assert peaks["ram"] < peaks["ram-kept"] - 0.4 * 32 * 80**3 * 4, peaks


def test_released_planes_cannot_be_read():
    from napari_meddiff.autoencoder.tiling import RamStore

    store = RamStore(4, (64, 32, 32), torch.float32, torch.device("cpu"), channels_last=True)
    store.release_below(10)
    assert store.released_below == 10
    store.view(((10, 20), (0, 32), (0, 32)))
    with pytest.raises(RuntimeError, match="released"):
        store.view(((9, 20), (0, 32), (0, 32)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_tiled_encode_of_one_channel_images_equals_whole(precision, monkeypatch):
    """A 1-channel image's first convolution weights are contiguous in both layouts: the pass still runs on
    channels-last stores (they release what they have read) and equals the whole encoder."""
    from napari_meddiff.autoencoder import tiling
    from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn
    from napari_meddiff.runtime.precision import autocast_context

    ae = prefer_channels_last(prefer_onednn(_autoencoder(3, seed=21)))
    x = torch.rand((1, 1, 40, 24, 28), generator=torch.Generator().manual_seed(22))
    layouts = []
    real_new = tiling._Stores.new

    def new(self, *args):
        layouts.append(self.channels_last)
        return real_new(self, *args)

    monkeypatch.setattr(tiling._Stores, "new", new)
    with torch.inference_mode(), autocast_context(x.device, precision):
        tiled_mu, tiled_sigma = tiled_encode(ae, x, tile=8)
        whole_mu, whole_sigma = ae.encode(x)
    assert layouts and all(layouts)
    atol = 1e-4 if precision == "fp32" else 0.05
    torch.testing.assert_close(tiled_mu.float(), whole_mu.float(), rtol=0, atol=atol)
    torch.testing.assert_close(tiled_sigma.float(), whole_sigma.float(), rtol=0, atol=atol)
