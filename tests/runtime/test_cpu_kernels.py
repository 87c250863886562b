"""The fast CPU paths (`runtime.cpu_kernels`) are the same computation: oneDNN convolutions, channels-last
layouts, bf16 weights cast once, and kernels that give the same bits for any thread count."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from napari_meddiff import MeddiffError, generate, load_model
from napari_meddiff.diffusion import loop
from napari_meddiff.runtime.cpu_kernels import prefer_channels_last, prefer_onednn, pytorch_kernels, uses_channels_last
from napari_meddiff.runtime.devices import native_bf16


def _conv_kernels(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "conv" in e.key}


def test_single_sample_3d_convolutions_run_on_onednn_and_agree(tiny_models):
    model = load_model(tiny_models["ddpm3d"])
    x = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), 500)
    with torch.inference_mode():
        fast = model.unet(x, timesteps=t)
        assert "aten::mkldnn_convolution" in _conv_kernels(lambda: model.unet(x, timesteps=t))
        with pytorch_kernels(model.unet):
            kernels = _conv_kernels(lambda: model.unet(x, timesteps=t))
            plain = model.unet(x, timesteps=t)
        assert "aten::slow_conv3d_forward" in kernels  # PyTorch's own choice for one small sample
        assert "aten::mkldnn_convolution" in _conv_kernels(lambda: model.unet(x, timesteps=t))  # restored
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_prefer_onednn_keeps_gradients_and_autocast():
    conv = prefer_onednn(torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1)))[0]
    x = torch.randn(1, 2, 5, 6, 7, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16


def test_same_volume_whatever_the_thread_count(tiny_models):
    """The widget leaves a core to the GUI; the CLI takes them all: a seed must give the same file either way."""
    model = load_model(tiny_models["ldm3d"])
    threads = torch.get_num_threads()
    try:
        volumes = []
        for n in (1, 2):
            torch.set_num_threads(n)
            volumes.append(generate(model, [8], sampler="dpm++", steps=4)[0].array)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(volumes[0], volumes[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_group_norm_gives_the_same_bits_for_any_thread_count(dtype):
    """PyTorch's channels-last GroupNorm sums per-thread partials; `prefer_channels_last`'s does not."""
    if dtype == torch.bfloat16 and not native_bf16(torch.device("cpu")):
        pytest.skip(
            "bf16 is emulated on this CPU: oneDNN's bf16 convolution keeps PyTorch's layout, and load_model "
            "uses channels-last only where bf16 is native"
        )
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 32, 3, padding=1), torch.nn.GroupNorm(8, 32)).to(dtype)
    x = torch.randn(1, 4, 24, 40, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    threads = torch.get_num_threads()

    def per_thread_count(fn):
        try:
            outs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                outs.append(fn())
            return outs
        finally:
            torch.set_num_threads(threads)

    with torch.inference_mode():
        h = net[0](x).contiguous(memory_format=torch.channels_last_3d)
        native = per_thread_count(lambda: net[1](h))
        prefer_channels_last(prefer_onednn(net))  # as load_model
        assert uses_channels_last(net) and net[0](x).is_contiguous(memory_format=torch.channels_last_3d)
        ours = per_thread_count(lambda: net[1](h))
        end_to_end = per_thread_count(lambda: net(x))
    assert not torch.equal(*native)  # what the patch is for (PyTorch 2.13's kernel)
    assert torch.equal(*ours) and ours[0].is_contiguous(memory_format=torch.channels_last_3d)
    # as accurate as PyTorch's own one-thread result, or better (its statistics are float32 running sums;
    # ours are chunked and merged in float64: test_cpu_kernels_accuracy.py)
    if dtype == torch.float32:
        gn = net[1]
        args = (gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps)
        reference = torch.nn.functional.group_norm(h.double().contiguous(), *args)
        error = {name: (out[0].double() - reference).abs().max() for name, out in (("ours", ours), ("torch", native))}
        assert error["ours"] <= error["torch"] + 1e-6, error
    assert torch.equal(*end_to_end)


def test_3d_models_use_channels_last_where_the_cpu_has_native_bf16(tiny_models):
    model = load_model(tiny_models["ldm3d"])
    expected = native_bf16(torch.device("cpu"))
    assert uses_channels_last(model.unet) == expected and uses_channels_last(model.autoencoder) == expected
    assert not uses_channels_last(load_model(tiny_models["ddpm2d"]).unet)  # 2D networks: no 3D convolutions


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="bf16 is emulated (some 1000x slower) on this CPU")
@pytest.mark.parametrize("name", ["ldm3d", "ddpm2d"])
def test_bf16_weights_cast_once_give_autocasts_bits(tiny_models, monkeypatch, name):
    model = load_model(tiny_models[name])
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    (once,) = generate(model, [3], steps=3, precision="bf16")
    assert all(torch.equal(v, weights[k]) and v.dtype == torch.float32 for k, v in model.unet.state_dict().items())
    monkeypatch.setattr(loop, "bf16_weights_once", lambda *a: contextlib.nullcontext())
    (every_call,) = generate(model, [3], steps=3, precision="bf16")
    np.testing.assert_array_equal(once.array, every_call.array)


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="bf16 is emulated (some 1000x slower) on this CPU")
@pytest.mark.parametrize("name", ["ldm3d", "ddpm2d"])
def test_model_loaded_for_bf16_holds_bf16_weights_and_gives_the_same_bits(tiny_models, name):
    plain = load_model(tiny_models[name])
    held = load_model(tiny_models[name], precision="auto")  # bf16 on this CPU
    assert held.unet_precision == "bf16" and plain.unet_precision is None
    convs = [m for m in held.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in held.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # autocast runs norms in fp32

    def nbytes(net):
        return sum(p.numel() * p.element_size() for p in net.parameters())

    assert nbytes(held.unet) < 0.6 * nbytes(plain.unet)
    assert uses_channels_last(held.unet) == uses_channels_last(plain.unet)
    (a,) = generate(plain, [4], steps=3, precision="bf16")
    (b,) = generate(held, [4], steps=3, precision="bf16")
    np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(MeddiffError, match="loaded to sample in bf16 only"):
        generate(held, [4], steps=3, precision="fp32")
    fp32 = load_model(tiny_models[name], precision="fp32")
    assert fp32.unet_precision is None and all(p.dtype == torch.float32 for p in fp32.unet.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_input_channel_chunks_are_one_convolution_to_bf16_rounding(monkeypatch, channels_last):
    from napari_meddiff.runtime import devices
    from napari_meddiff.runtime.cpu_kernels import bf16_weights_once

    monkeypatch.setattr(devices, "cpu_has_amx", lambda: True)  # the chunks are for AMX; their sums anywhere
    net = prefer_onednn(torch.nn.Sequential(torch.nn.Conv3d(600, 8, 3, padding=1), torch.nn.SiLU()))
    if channels_last:
        prefer_channels_last(net)
    x = torch.randn(1, 600, 6, 7, 5, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = net(x).float()
        with bf16_weights_once(net, "bf16", cpu):
            assert len(net[0]._meddiff_weight_chunks) == 3 and net[0].bias.dtype == torch.bfloat16
            assert all(w.dtype == torch.bfloat16 for w in net[0]._meddiff_weight_chunks)
            chunked = net(x)
            assert chunked.dtype == torch.bfloat16
        assert net[0].weight.dtype == torch.float32 and "_meddiff_weight_chunks" not in net[0].__dict__
        torch.testing.assert_close(net(x).float(), whole, rtol=0, atol=0)  # restored
    torch.testing.assert_close(chunked.float(), whole, rtol=2e-2, atol=2e-2 * float(whole.abs().max()))
    assert not torch.equal(chunked.float(), whole)  # they are different sums


@pytest.mark.parametrize("channels_last", [False, True])
def test_held_bf16_weights_are_released_for_their_chunks_and_rebuilt(monkeypatch, channels_last):
    from napari_meddiff.runtime import devices
    from napari_meddiff.runtime.cpu_kernels import bf16_weights_once, hold_bf16_weights

    monkeypatch.setattr(devices, "cpu_has_amx", lambda: True)
    net = prefer_onednn(torch.nn.Sequential(torch.nn.Conv3d(600, 8, 3, padding=1), torch.nn.SiLU()))
    if channels_last:
        prefer_channels_last(net)
    hold_bf16_weights(net)
    original = net[0].weight.detach().clone()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(1, 600, 6, 7, 5, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with bf16_weights_once(net, "bf16", cpu):
            assert net[0].weight is None  # no second copy while the chunks stand in
            chunked = net(x)
        after = net(x)
        with bf16_weights_once(net, "bf16", cpu):
            again = net(x)
    weight = net[0].weight
    assert isinstance(weight, torch.nn.Parameter) and weight.dtype == torch.bfloat16
    assert weight.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(weight, original, rtol=0, atol=0)
    torch.testing.assert_close(again, chunked, rtol=0, atol=0)
    assert after.shape == chunked.shape and "_meddiff_weight_chunks" not in net[0].__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(175, 3072, 768), (1400, 512, 4096), (64, 64, 4)])
def test_linear_layers_give_the_same_bits_for_any_thread_count(dtype, shape):
    """The Zoo brain LDM's feed-forward shapes, whose sums oneDNN/MKL split by thread (the first two large enough
    to run as two halves on two threads), and a small one that stays whole; under bf16 autocast too."""
    from napari_meddiff.runtime.cpu_kernels import thread_invariant_linear

    tokens, features, out_features = shape
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(features, out_features).to(dtype)
    x = torch.randn(1, tokens, features, generator=g).to(dtype)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        plain = lin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            autocast_plain = lin(x)
        thread_invariant_linear(lin)
        outs, autocast_outs = [], []
        try:
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                outs.append(lin(x))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
                    autocast_outs.append(lin(x))
        finally:
            torch.set_num_threads(threads)
    for out, ref in ((outs, plain), (autocast_outs, autocast_plain)):
        assert all(torch.equal(o, out[0]) for o in out[1:])
        assert out[0].dtype == ref.dtype and out[0].shape == ref.shape
        torch.testing.assert_close(out[0], ref, **({} if ref.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("trainable", ["input", "bias"])
def test_thread_invariant_linear_keeps_gradients(trainable):
    """Outside inference mode the product stays whole (no second thread), so the autograd graph covers all of
    it: with 2 threads too, also when only the bias is trained."""
    from napari_meddiff.runtime.cpu_kernels import thread_invariant_linear

    lin = torch.nn.Linear(512, 4096)
    lin.weight.requires_grad_(False)
    x = torch.randn(1400, 512, requires_grad=trainable == "input")
    wrt = x if trainable == "input" else lin.bias
    expected = torch.autograd.grad(lin(x).square().sum(), wrt)[0]
    thread_invariant_linear(lin)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = torch.autograd.grad(lin(x).square().sum(), wrt)[0]
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, expected)


def test_thread_invariant_linear_runs_fixed_halves_each_in_one_thread(monkeypatch):
    """What makes the bits thread-invariant on CPUs whose oneDNN splits sums by thread (the AMX Xeon's did; this
    check does not depend on the CPU): the same two halves for 1 and 2 caller threads, each computed with one
    intra-op thread, the second on its own thread only when the caller has two."""
    import threading

    from napari_meddiff.runtime import cpu_kernels

    calls = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        calls.append((threading.current_thread().name.split("_")[0], torch.get_num_threads(), tuple(weight.shape)))
        return real_linear(x, weight, bias)

    lin = cpu_kernels.thread_invariant_linear(torch.nn.Linear(512, 4096))
    x = torch.randn(1400, 512)
    monkeypatch.setattr(cpu_kernels.F, "linear", spy)
    threads = torch.get_num_threads()
    seen = {}
    try:
        with torch.inference_mode():
            for n in (1, 2):
                torch.set_num_threads(n)
                calls.clear()
                lin(x)
                seen[n] = sorted(calls)
                assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    main = threading.main_thread().name
    assert seen[1] == [(main, 1, (2048, 512)), (main, 1, (2048, 512))]
    assert seen[2] == sorted([(main, 1, (2048, 512)), ("meddiff-linear", 1, (2048, 512))])
