"""CPU kernel choice for 3D convolutions.

PyTorch sends a single-sample fp32 3D convolution with a 3x3x3 kernel and few ``channels x rows`` to its
native im2col kernel (a heuristic written for 2D images) and everything else to oneDNN. For the small 3D
networks of diffusion models oneDNN is 2-3x faster there: brain-ldm-3d's UNet step went from 89 to 48 ms on
one core and from 81 to 32 ms on two (benchmarks/bench_speed.py measures it). `prefer_onednn` routes such
convolutions to oneDNN; bf16/fp16 autocast, CUDA and 2D convolutions keep PyTorch's own choice.

Weights and activations stay in PyTorch's default (contiguous, NCDHW) layout. ``channels_last_3d`` would let
oneDNN run its blocked NDHWC kernels, faster on a 2-core AVX2 EPYC (decoding 198 -> 173 ms, UNet step 64 ->
55 ms; benchmarks/bench_speed.py, results/speed.json), but its results then depend on the thread count, and a
seed must give the same volume, bit for bit, in the napari widget (which leaves a core to the GUI) and on the
command line (tests/test_speed_paths.py checks 1 against 2 threads). With the default layout they do.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch


def _onednn_conv3d_forward(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and self.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):
        return torch.ops.aten.mkldnn_convolution(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
        )
    return self._conv_forward(x, self.weight, self.bias)


def prefer_onednn(module: torch.nn.Module) -> torch.nn.Module:
    """Route the fp32 CPU forward of every zero-padded `Conv3d` in ``module`` to oneDNN (in place)."""
    if not torch.backends.mkldnn.is_available():
        return module
    for conv in module.modules():
        if type(conv) is torch.nn.Conv3d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            conv.forward = types.MethodType(_onednn_conv3d_forward, conv)
    return module


@contextlib.contextmanager
def pytorch_kernels(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Within the block, the convolutions of ``modules`` (None skipped) use PyTorch's own kernel choice again
    (for baselines)."""
    saved = {
        conv: conv.__dict__.pop("forward")
        for module in modules if module is not None
        for conv in module.modules() if "forward" in conv.__dict__
    }
    try:
        yield
    finally:
        for conv, forward in saved.items():
            conv.forward = forward
