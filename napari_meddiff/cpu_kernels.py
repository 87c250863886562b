"""CPU kernel choice and memory layout for 3D convolutions.

PyTorch sends a single-sample fp32 3D convolution with a 3x3x3 kernel and few ``channels x rows`` to its
native im2col kernel (a heuristic written for 2D images) and everything else to oneDNN. For the small 3D
networks of diffusion models oneDNN is 2-3x faster there: brain-ldm-3d's UNet step went from 89 to 48 ms on
one core and from 81 to 32 ms on two (benchmarks/bench_speed.py measures it). `prefer_onednn` routes such
convolutions to oneDNN; bf16/fp16 autocast, CUDA and 2D convolutions keep PyTorch's own choice.

On top of that, 3D networks on the CPU keep their weights ``channels_last_3d`` (`memory_format_for`), which
lets oneDNN run its blocked NDHWC kernels: on a 2-core AVX2 EPYC brain-ldm-3d's UNet step went from 66 to
52 ms and its decoding from 207 to 180 ms. On an H200 the same layout was 5-15 % slower, so CUDA keeps
PyTorch's default.
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


def memory_format_for(module: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """``channels_last_3d`` for a network with 3D convolutions on the CPU, else the contiguous default."""
    has_conv3d = any(type(m) is torch.nn.Conv3d for m in module.modules())
    return torch.channels_last_3d if device.type == "cpu" and has_conv3d else torch.contiguous_format


def _memory_format(module: torch.nn.Module) -> torch.memory_format:
    for p in module.parameters():
        if p.dim() == 5 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


@contextlib.contextmanager
def pytorch_kernels(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``module``'s convolutions use PyTorch's own kernel choice and memory layout again
    (for baselines)."""
    saved = {conv: conv.__dict__.pop("forward") for conv in module.modules() if "forward" in conv.__dict__}
    layout = _memory_format(module)
    module.to(memory_format=torch.contiguous_format)
    try:
        yield module
    finally:
        module.to(memory_format=layout)
        for conv, forward in saved.items():
            conv.forward = forward
