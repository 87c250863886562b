"""CPU kernel choice for 3D convolutions.

PyTorch sends a single-sample fp32 3D convolution with a 3x3x3 kernel and few ``channels x rows`` to its
native im2col kernel (a heuristic written for 2D images) and everything else to oneDNN. For the small 3D
networks of diffusion models oneDNN is 2-3x faster there: brain-ldm-3d's UNet step went from 89 to 48 ms on
one core and from 81 to 32 ms on two (benchmarks/bench_speed.py measures it). `prefer_onednn` routes such
convolutions to oneDNN; bf16/fp16 autocast, CUDA and 2D convolutions keep PyTorch's own choice.

Layout: on CPUs that compute bf16 natively (AVX-512 BF16, AMX) `prefer_channels_last` stores the 3D
convolution weights in ``channels_last_3d``, so that activations follow and oneDNN runs its blocked NDHWC kernels
(AMX tiles under bf16 autocast: the Zoo brain LDM's decoding 2.4-2.5x and, with `bf16_weights_once`, its UNet
step 1.3x faster than in the default layout on an AMX Xeon, benchmarks/bench_layout.py).
Its convolutions give the same bits whatever the thread count, but PyTorch's channels-last GroupNorm sums
per-thread partial statistics (a seed would give a slightly different volume in the napari widget, which leaves a
core to the GUI, and on the command line), and even in one thread it sums x and x^2 sequentially in float32 and
takes E[x^2] - E[x]^2: the error grew with the volume and with the activations' offsets, to 2.7e-2 (0.25 % of the
output range) off a float64 decode for the brain LDM at 160x224x160, where MONAI's default-layout pass and the
tiled pass were 1e-5 off. `prefer_channels_last` therefore normalises a channels-last activation with
`channel_stats`, the tiled pass's statistics (fixed chunks reduced in one thread, merged in float64), and
`F.batch_norm`'s per-channel scale and shift: whole fp32 decodes within 1e-5 of the range of float64 like the
other passes, the same bits for any thread count (tests/runtime/test_cpu_kernels_accuracy.py), and GroupNorm,
bound by memory, about 1.2-2x PyTorch's one-thread kernel (0-7 % of a decode on a busy 2-core AVX2 EPYC).
Elsewhere (AVX2-only CPUs, where fp32 is used) weights stay in the default layout and norms keep PyTorch's kernel.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


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
        sub: forward for module in modules if module is not None for sub, forward in drop_kernel_choices(module).items()
    }
    try:
        yield
    finally:
        for conv, forward in saved.items():
            conv.forward = forward


def drop_kernel_choices(module: torch.nn.Module) -> dict[torch.nn.Module, object]:
    """Remove every per-instance ``forward`` override of ``module`` (the choices made here, in place); returns
    them, by submodule, for whoever puts them back.

    Each override is a reference cycle (module -> bound method -> module): without them a module that is no
    longer referenced is freed at once, with no full garbage collection (which walks every object torch and
    MONAI created)."""
    return {sub: sub.__dict__.pop("forward") for sub in module.modules() if "forward" in sub.__dict__}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch's intra-op work in the calling thread only, within the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


STATS_CHUNK_BYTES = 1 << 20  # float32 bytes of one chunk of `channel_stats` (about a core's L2 cache)
STATS_ROW = 64  # values per row of `channel_stats`' centred squares (whole voxels: 8 of 8 channels, 2 of 32)


def channel_stats(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and centred sum of squares of one sample (1, C, *spatial), as float64, and its voxels.

    The values are taken as (voxels, C) (a view of a channels-last tensor; a channel-first one is transposed in
    chunks) and reduced in chunks of `STATS_CHUNK_BYTES`, each in cache: its mean (a matrix product with a ones
    vector: reductions over the outer axis ran 4-7x slower), then its centred squares in one reused buffer (rows of
    at least `STATS_ROW` values: subtracting an 8-channel mean row by row took twice as long) and their sums; a
    float32 copy of the whole tensor (134 MB for a 64^3 x 128 bf16 tile) was a fresh allocation, page faults and
    three passes through memory (several times slower in hand timings). The chunks' (mean, M2) are merged in
    float64 (Chan et al.): the error does not grow with the volume. One thread: the chunks depend on the shape only,
    so the bits do not depend on the thread count, and it is faster (a second thread woken for each small chunk
    cost more than it gave). Float32 sums under bf16 autocast too; ``x`` is left untouched. Used by the tiled
    pass for each tile and by `prefer_channels_last`'s GroupNorm for the whole activation."""
    channels = x.shape[1]
    if channels_last:
        values = x.permute(0, *range(2, x.ndim), 1).reshape(-1, channels)
    else:
        values = x[0].reshape(channels, -1).t()
    n = values.shape[0]
    rows = max(1, min(n, STATS_CHUNK_BYTES // (4 * channels))) if x.device.type == "cpu" else n  # GPU: one go
    starts = range(0, n, rows)
    means = torch.empty(len(starts), channels, dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    ones = torch.ones(1, rows, dtype=torch.float32, device=x.device)
    buffer = torch.empty(rows * channels, dtype=torch.float32, device=x.device)
    direct = values.dtype == torch.float32 and values.is_contiguous()  # else each chunk is copied to the buffer
    voxels_per_row = max(1, STATS_ROW // channels)
    threads = one_thread() if x.device.type == "cpu" else contextlib.nullcontext()
    with threads, torch.autocast(x.device.type, enabled=False):  # float32 sums, also under bf16 autocast
        for k, a in enumerate(starts):
            chunk = values[a : a + rows]
            r = chunk.shape[0]
            centred = buffer[: r * channels].view(r, channels)
            if not direct:
                chunk = centred.copy_(chunk)
            mean = torch.mm(ones[:, :r], chunk, out=means[k : k + 1]).div_(r)
            wide = voxels_per_row if r % voxels_per_row == 0 else 1
            row = (-1, wide * channels)
            torch.sub(chunk.view(row), mean.repeat(1, wide), out=centred.view(row)).square_()
            torch.sum(torch.mm(ones[:, : r // wide], centred.view(row)).view(wide, channels), 0, out=m2s[k])
    counts = torch.tensor([min(rows, n - a) for a in starts], dtype=torch.float64)[:, None].to(x.device)
    means64 = means.double()
    mean = (means64 * counts).sum(0) / n
    m2 = m2s.double().sum(0) + (counts * (means64 - mean).square()).sum(0)
    return mean, m2, n


def group_moments(mean: torch.Tensor, m2: torch.Tensor, count: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of the ``groups`` channel groups, float64, from the per-channel
    ``mean`` and centred sums of squares ``m2`` (float64) of ``count`` voxels each (`channel_stats`)."""
    per_group = mean.shape[0] // groups
    means = mean.view(groups, per_group)
    group_mean = means.mean(1, keepdim=True)
    group_m2 = m2.view(groups, per_group).sum(1) + count * (means - group_mean).square().sum(1)
    var = group_m2 / (per_group * count)
    return group_mean[:, 0].repeat_interleave(per_group), var.repeat_interleave(per_group)


def _accurate_group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of a channels-last CPU activation, in one thread: group statistics from `channel_stats` (float64
    merges; the same bits for any thread count), then per channel ``x * scale + shift`` by `F.batch_norm`, in the
    dtypes F.group_norm gives (a bf16 input gives a bf16 output; statistics in float32/64). One thread: GroupNorm is
    bound by memory, and on a busy 2-core CPU a second thread's parallel region cost more than it gave (a 32-channel
    GroupNorm of 20x24x16 voxels: 0.6 ms in one thread, 7-11 ms in two)."""
    channels_last = x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.device.type != "cpu" or not channels_last or x.numel() == 0:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    with one_thread():
        if torch.is_grad_enabled() and x.requires_grad:  # statistics outside autograd: PyTorch's kernel
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        mean, var = group_moments(*channel_stats(x, channels_last=True), self.num_groups)
        return F.batch_norm(x, mean.float(), var.float(), self.weight, self.bias, False, 0.0, self.eps)


def _channels_last_input(forward):
    def conv_forward(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and not x.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)  # once, at a network's first convolution
        return forward(x)

    return conv_forward


LINEAR_SPLIT_MIN_MACS = 1 << 25  # smaller products stay whole: handing half to a second thread costs more
_linear_worker: ThreadPoolExecutor | None = None


def _second_thread() -> ThreadPoolExecutor:
    global _linear_worker
    if _linear_worker is None:
        _linear_worker = ThreadPoolExecutor(1, "meddiff-linear")
    return _linear_worker


def _forget_second_thread() -> None:  # a forked child has no such thread
    global _linear_worker
    _linear_worker = None


os.register_at_fork(after_in_child=_forget_second_thread)


def _linear_halves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """``F.linear`` as two fixed halves of its output features, each a one-thread product: the halves depend on
    the shapes only, so the bits do not depend on ``threads``; with two or more the second half runs on a second
    thread (as fast as PyTorch's own two threads). Autocast, thread-local, is applied here as it would cast."""
    if torch.is_autocast_enabled("cpu"):  # autocast casts floating tensors other than float64
        dtype = torch.get_autocast_dtype("cpu")
        x, weight, bias = (
            t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
            for t in (x, weight, bias)
        )
    half = (weight.shape[0] + 1) // 2
    parts = [
        (weight[:half], None if bias is None else bias[:half]),
        (weight[half:], None if bias is None else bias[half:]),
    ]
    inference = torch.is_inference_mode_enabled()

    def second() -> torch.Tensor:
        torch.set_num_threads(1)  # the worker's own setting (OpenMP's is per thread), whatever was set meanwhile
        with torch.inference_mode(inference), torch.no_grad():
            return F.linear(x, *parts[1])

    pending = None
    if threads >= 2:
        try:
            pending = _second_thread().submit(second)
        except RuntimeError:  # the interpreter is shutting down: no new threads, both halves here
            pass
    with torch.autocast("cpu", enabled=False):
        first = F.linear(x, *parts[0])
        return torch.cat([first, pending.result() if pending is not None else F.linear(x, *parts[1])], dim=-1)


def _thread_invariant_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return F.linear(x, self.weight, self.bias)
    threads = torch.get_num_threads()
    with one_thread():  # a product over few rows splits its sums across threads: one thread, the same bits
        if (
            not _plain_inference(x, self)
            or x.numel() * self.out_features < LINEAR_SPLIT_MIN_MACS
            or self.out_features < 128
        ):
            return F.linear(x, self.weight, self.bias)
        return _linear_halves(x, self.weight, self.bias, threads)


def _plain_inference(x: torch.Tensor, layer: torch.nn.Linear) -> bool:
    """True under inference mode (nothing records gradients) with plain tensors, not traced: a second thread,
    whose autograd, tracing and transform states are its own, may compute part of the call."""
    return (
        torch.is_inference_mode_enabled()
        and not torch.jit.is_tracing()
        and not any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (x, layer.weight, layer.bias)
        )
    )


def thread_invariant_linear(module: torch.nn.Module) -> torch.nn.Module:
    """Every `nn.Linear` of ``module`` computes the same bits whatever the CPU thread count (in place).

    Matrix products with few rows and long sums are split along the sum across threads (oneDNN/MKL), so their
    results depend on the thread count: the Zoo brain LDM's transformer feed-forward (175 tokens x 3072 -> 768)
    gave different bits with 1 and 2 threads, in bf16 and in fp32. Here every product runs in one thread, and a
    large one under inference mode (nothing recorded, traced or transformed) as two fixed halves of its output
    features on two threads when the caller has them (``benchmarks/bench_layout.py --linears`` times the Zoo
    UNet's linear layers this way against PyTorch's own threads)."""
    for sub in module.modules():
        if type(sub) is torch.nn.Linear:
            sub.forward = types.MethodType(_thread_invariant_linear_forward, sub)
    return module


def prefer_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``channels_last_3d`` weights and inputs for every `Conv3d` of ``module`` (after `prefer_onednn`, if used)
    and accurate, thread-invariant GroupNorms of channels-last activations (in place)."""
    for sub in module.modules():
        if type(sub) is torch.nn.Conv3d:
            sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last_3d)
            sub.forward = _channels_last_input(sub.forward)
        elif type(sub) is torch.nn.GroupNorm:
            sub.forward = types.MethodType(_accurate_group_norm, sub)
    return module


def uses_channels_last(module: torch.nn.Module) -> bool:
    """True when ``module``'s 3D convolution weights are stored channels-last (`prefer_channels_last`)."""
    weights = [m.weight for m in module.modules() if type(m) is torch.nn.Conv3d]
    return any(not w.is_contiguous() for w in weights) and all(
        w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights
    )


WEIGHT_LAYERS = (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear)  # whose weights bf16 autocast casts


def hold_bf16_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Replace the fp32 weights and biases of ``module``'s convolutions and linear layers by bf16 ones (in place;
    memory layout kept; the fp32 tensors are released).

    bf16 autocast casts exactly these to bf16 (round to nearest) at every call, so under autocast the module
    computes the same bits as before, with half the weights' memory: the Zoo brain LDM's UNet holds 1.1 GB
    instead of 2.2 GB. Norms keep fp32 weights (autocast runs them in fp32). Such a module is for bf16 only."""
    for sub in module.modules():
        if isinstance(sub, WEIGHT_LAYERS):
            for name in ("weight", "bias"):
                p = sub._parameters.get(name)
                if p is not None and p.dtype == torch.float32:
                    sub._parameters[name] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    return module


AMX_INPUT_CHUNK = 256  # input channels per convolution on AMX (see `bf16_weights_once`)


def _input_split_conv3d(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The convolution as a sum over input-channel chunks (bf16 partials added in fp32, rounded once)."""
    out = None
    for start, weight in zip(range(0, self.in_channels, AMX_INPUT_CHUNK), self._meddiff_weight_chunks):
        part = F.conv3d(
            x[:, start : start + AMX_INPUT_CHUNK].to(torch.bfloat16),
            weight,
            self.bias if out is None else None,
            self.stride,
            self.padding,
            self.dilation,
        ).float()
        out = part if out is None else out.add_(part)
    return out.to(torch.bfloat16)


@contextlib.contextmanager
def bf16_weights_once(module: torch.nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Within the block, ``module``'s convolutions and linear layers hold bf16 copies of their fp32 weights (CPU,
    ``precision`` bf16; otherwise a no-op), and on AMX CPUs 3D convolutions of more than 256 input channels
    run as sums over 256-channel chunks.

    Autocast casts every fp32 weight to bf16 at every call (it caches casts only of weights that require
    gradients): 16 % of a Zoo brain LDM UNet step on an AMX Xeon. The copies are the same round-to-nearest casts,
    so the results are bitwise those of autocast; they cost half the weights' memory while the block lasts.
    oneDNN's AMX convolution ran the Zoo UNet's 512-1536 input channels 1.8-3.5x slower than the same work in
    256-channel chunks (512 -> 512 channels on 20x28x20: 275 against 79 ms; `bench_layout.py --convs-only`,
    results/layout_convs.json; 448 channels, a width no shipped or Zoo network has, lost 0.83-0.95x in two runs):
    those sums differ from one convolution by bf16 rounding only, and like it do not depend on the thread count. Weights
    already held in bf16 (`hold_bf16_weights`) are released while their chunks stand in for them and rebuilt from
    the chunks afterwards (the same values): no second copy of the Zoo UNet's 1.1 GB."""
    if device.type != "cpu" or precision != "bf16":
        yield
        return
    from napari_meddiff.runtime.devices import cpu_has_amx

    split = cpu_has_amx()
    saved, split_convs = [], []
    for sub in module.modules():
        if not isinstance(sub, WEIGHT_LAYERS):
            continue
        chunked = (
            split
            and type(sub) is torch.nn.Conv3d
            and sub.in_channels > AMX_INPUT_CHUNK
            and sub.groups == 1
            and sub.padding_mode == "zeros"
            and not isinstance(sub.padding, str)
        )
        if chunked:  # the chunks replace the whole bf16 weight (its forward reads only them)
            fmt = torch.channels_last_3d if uses_channels_last(sub) else torch.contiguous_format
            sub._meddiff_weight_chunks = [
                sub.weight[:, i : i + AMX_INPUT_CHUNK].to(torch.bfloat16).contiguous(memory_format=fmt)
                for i in range(0, sub.in_channels, AMX_INPUT_CHUNK)
            ]
            held = sub.weight.dtype == torch.bfloat16  # `hold_bf16_weights`: the chunks stand in for it meanwhile
            split_convs.append((sub, sub.__dict__.get("forward"), sub._parameters["weight"] if held else None, fmt))
            if held:
                with torch.inference_mode(False):
                    sub.weight.data = torch.empty(0, dtype=torch.bfloat16)
                sub._parameters["weight"] = None
            forward = types.MethodType(_input_split_conv3d, sub)
            sub.forward = _channels_last_input(forward) if fmt == torch.channels_last_3d else forward
        for name in ("bias",) if chunked else ("weight", "bias"):
            p = sub._parameters.get(name)
            if p is not None and p.dtype == torch.float32:
                saved.append((sub, name, p))
                sub._parameters[name] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for sub, name, p in saved:
            sub._parameters[name] = p
        for sub, forward, held, fmt in split_convs:
            if held is not None:  # the same values, from the chunks (the held tensor was released meanwhile)
                with torch.inference_mode(False):
                    held.data = torch.cat(sub._meddiff_weight_chunks, dim=1).contiguous(memory_format=fmt)
                sub._parameters["weight"] = held
            del sub._meddiff_weight_chunks
            if forward is None:
                del sub.forward
            else:
                sub.forward = forward
