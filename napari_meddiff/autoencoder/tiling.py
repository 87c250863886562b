"""Exact tiled autoencoder passes: the whole-volume result, with memory set by the tiles and stores.

A MONAI `AutoencoderKL` (or MAISI's `AutoencoderKlMaisi`) decoder or encoder runs one convolution at a time
(a `ConvStep`). Each convolution's output is computed tile by tile from its input, read with the halo the kernel
needs; zeros are padded only at the volume's borders, where the whole pass pads. What comes before the
convolution inside its block (GroupNorm + SiLU, or the 2x upsampling, nearest or MAISI's trilinear) is applied
to each input tile on the fly, and a residual block's shortcut is added to each output tile. GroupNorm needs
statistics of the whole volume: every stored activation accumulates per-channel sums and sums of squares
(float64) as its tiles are written, and the next step's norm uses them. The result therefore equals the
whole-volume pass to floating-point error (under bf16 autocast, each tile's arithmetic runs in the same dtypes
as the whole pass).

Per tile, a channels-last activation (`load_model`'s layout on bf16 CPUs; a view of its store in memory, or the
tile read from its file: the same slabs, the same bits) is normalised slab by slab straight into one reused,
zero-bordered input buffer (no padded copy, no fresh pages per tile), an identity residual is added from its
store in place, and the statistics are reduced in cache-sized chunks: fresh
tile-sized tensors (page faults on every tile) and passes through memory had cost the Zoo brain LDM's full-size
decode as much as half its convolutions' time (`benchmarks/bench_layout.py` times it against the whole pass).

Memory: a residual block stores its input and its first convolution's output, and writes its output over its
input, tile by tile, where the two have the same channels; where it changes the channels, its 1x1 shortcut is
computed beside the first convolution, so that the block's input goes before the second (MONAI's whole pass
holds 5-7 such tensors in fp32, plus temporaries), in the dtype the convolutions produce (bf16 under bf16
autocast), plus one tile's workspace. Tiles go in C order, so a channels-last store in memory gives back the
planes of its first axis that no later tile of its last reader needs, while that step's output grows. Stores
that would take the memory over ``ram_bytes`` are written to files instead (memory-mapped one tile at a time):
peak memory is then about ``ram_bytes`` plus a tile's workspace, whatever the volume. Whole-volume
self-attention cannot be tiled exactly: networks with attention blocks are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_meddiff.errors import MeddiffError
from napari_meddiff.runtime.cpu_kernels import channel_stats, group_moments

Box = tuple[tuple[int, int], ...]  # (start, stop) per spatial axis
DEFAULT_TILE = {2: 512, 3: 48}  # output voxels per side of a tile (3D: 48 decoded the Zoo brain LDM as fast as 64,
# with 40 % of its per-tile temporaries)
WHOLE_PASS_ACTIVATIONS = 5  # a whole pass peaks at about this many of its largest activation, in fp32


@dataclasses.dataclass
class ConvStep:
    """``out = shortcut(residual) + conv(zero_pad(upsample(silu(norm(src)))))``, each part optional; with
    ``side``, also ``side_out = side(src)`` on the same boxes (a residual block's 1x1 shortcut, computed while the
    block's input is still held, so that the input can go before the block's second convolution)."""

    conv: nn.Module  # an nn.Conv2d / nn.Conv3d (its own padding is replaced by ``pad``)
    src: str
    out: str
    pad: tuple[tuple[int, int], ...]  # zeros (before, after) on each spatial axis of the convolution's input
    norm: nn.GroupNorm | None = None
    silu: bool = False
    upsample: str | None = None  # "nearest" or "linear" (align_corners=False), scale 2
    residual: str | None = None
    shortcut: nn.Module | None = None  # 1x1 convolution of the residual (None: identity)
    side: nn.Module | None = None  # 1x1 convolution of ``src`` (stride 1, no upsampling: the same boxes)
    side_out: str | None = None

    def out_shape(self, src_shape: Sequence[int]) -> tuple[int, ...]:
        pre = [2 * n if self.upsample else n for n in src_shape]
        return tuple(
            (n + lo + hi - k) // s + 1
            for n, (lo, hi), k, s in zip(pre, self.pad, self.conv.kernel_size, self.conv.stride)
        )


# --- the networks as steps -------------------------------------------------------------------------


def _inner_conv(module: nn.Module) -> nn.Module:
    """The nn.ConvNd inside a MONAI `Convolution(conv_only=True)` / MAISI `MaisiConvolution` (or itself)."""
    while not isinstance(module, (nn.Conv2d, nn.Conv3d)):
        children = dict(module.named_children())
        if set(children) != {"conv"}:
            raise MeddiffError(f"exact tiling does not support {type(module).__name__} (only plain convolutions)")
        module = children["conv"]
    if module.padding_mode != "zeros" or isinstance(module.padding, str) or any(d != 1 for d in module.dilation):
        raise MeddiffError("exact tiling supports zero-padded, undilated convolutions only")
    return module


def _same_pad(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((p, p) for p in conv.padding)


def _upsample_mode(block: nn.Module) -> tuple[str, nn.Module]:
    """(mode, post-convolution) of a MONAI `UpSample` (non-trainable) or MAISI `MaisiUpsample`."""
    if hasattr(block, "use_convtranspose"):  # MAISI: F.interpolate(scale 2, trilinear) then its convolution
        if block.use_convtranspose:
            raise MeddiffError("exact tiling does not support transposed-convolution upsampling")
        return "linear", block.conv
    children = dict(block.named_children())
    up = children.get("upsample_non_trainable")
    if up is None or "postconv" not in children:
        raise MeddiffError("exact tiling supports only non-trainable 2x upsampling followed by a convolution")
    scales = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,)
    if any(float(s) != 2.0 for s in scales) or up.mode not in ("nearest", "bilinear", "trilinear"):
        raise MeddiffError(f"exact tiling does not support {up.mode} upsampling by {up.scale_factor}")
    if up.mode != "nearest" and up.align_corners:
        raise MeddiffError("exact tiling does not support align_corners upsampling")
    return ("nearest" if up.mode == "nearest" else "linear"), children["postconv"]


def network_steps(blocks: Sequence[nn.Module], src: str, prefix: str) -> tuple[list[ConvStep], str]:
    """The `ConvStep`s of an encoder's or decoder's ``blocks`` starting from store ``src``; returns (steps, out)."""
    steps: list[ConvStep] = []
    names = (f"{prefix}{i}" for i in itertools.count())
    pending_norm: nn.GroupNorm | None = None
    for block in blocks:
        if isinstance(block, nn.GroupNorm):
            pending_norm = block
            continue
        if pending_norm is not None and not _is_plain_conv(block):
            raise MeddiffError("exact tiling expects a GroupNorm to be followed by a convolution")
        if all(hasattr(block, a) for a in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")):
            conv1, conv2 = _inner_conv(block.conv1), _inner_conv(block.conv2)
            shortcut = None if isinstance(block.nin_shortcut, nn.Identity) else _inner_conv(block.nin_shortcut)
            h, out = next(names), next(names)
            if shortcut is None:
                steps.append(ConvStep(conv1, src, h, _same_pad(conv1), norm=block.norm1, silu=True))
                steps.append(ConvStep(conv2, h, out, _same_pad(conv2), norm=block.norm2, silu=True, residual=src))
            else:  # the shortcut beside conv1: the block's input is not needed after it (`run_steps` frees it)
                if any(s != 1 for s in conv1.stride):
                    raise MeddiffError("exact tiling expects a residual block's first convolution to keep the size")
                skip = next(names)
                steps.append(
                    ConvStep(conv1, src, h, _same_pad(conv1), norm=block.norm1, silu=True, side=shortcut, side_out=skip)
                )
                steps.append(ConvStep(conv2, h, out, _same_pad(conv2), norm=block.norm2, silu=True, residual=skip))
        elif hasattr(block, "pad") and hasattr(block, "conv"):  # AEKLDownsample / MaisiDownsample: pad (0, 1)
            conv = _inner_conv(block.conv)
            out = next(names)
            steps.append(ConvStep(conv, src, out, tuple((0, 1) for _ in conv.kernel_size)))
        elif hasattr(block, "use_convtranspose") or "upsample_non_trainable" in dict(block.named_children()):
            mode, post = _upsample_mode(block)
            conv = _inner_conv(post)
            out = next(names)
            steps.append(ConvStep(conv, src, out, _same_pad(conv), upsample=mode))
        elif _is_plain_conv(block):
            conv = _inner_conv(block)
            out = next(names)
            steps.append(ConvStep(conv, src, out, _same_pad(conv), norm=pending_norm))
            pending_norm = None
        else:
            raise MeddiffError(
                f"exact tiling does not support {type(block).__name__} blocks (whole-volume attention cannot be "
                "split into tiles); use a whole pass"
            )
        src = out
    if pending_norm is not None:
        raise MeddiffError("exact tiling expects a GroupNorm to be followed by a convolution")
    return steps, src


def _is_plain_conv(block: nn.Module) -> bool:
    try:
        _inner_conv(block)
    except MeddiffError:
        return False
    return True


def decoder_steps(autoencoder: nn.Module) -> tuple[list[ConvStep], str]:
    """Steps of ``autoencoder.decode`` (post-quantisation 1x1 convolution, then the decoder) from store "z"."""
    post = _inner_conv(autoencoder.post_quant_conv)
    steps = [ConvStep(post, "z", "post", _same_pad(post))]
    more, out = network_steps(list(autoencoder.decoder.blocks), "post", "dec")
    return steps + more, out


def encoder_steps(autoencoder: nn.Module) -> tuple[list[ConvStep], str, str]:
    """Steps of ``autoencoder.encode`` from store "x"; returns (steps, mu store, log-variance store)."""
    steps, h = network_steps(list(autoencoder.encoder.blocks), "x", "enc")
    mu, log_var = _inner_conv(autoencoder.quant_conv_mu), _inner_conv(autoencoder.quant_conv_log_sigma)
    steps.append(ConvStep(mu, h, "mu", _same_pad(mu)))
    steps.append(ConvStep(log_var, h, "log_var", _same_pad(log_var)))
    return steps, "mu", "log_var"


# --- stores ----------------------------------------------------------------------------------------


def _slices(box: Box) -> tuple[slice, ...]:
    return (slice(None),) + tuple(slice(a, b) for a, b in box)


class Store:
    """One sample's activation ``(1, C, *shape)``, written and read by tiles, with per-channel float64 statistics.

    ``channels_last``: held with the channels innermost (3D), so that tiles go to and from `channels_last_3d`
    convolutions as block copies (writing such a tile into a channel-first store took 15x as long)."""

    def __init__(
        self, channels: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool = False
    ) -> None:
        self.channels, self.shape, self.dtype, self.device = channels, tuple(shape), dtype, device
        self.channels_last = bool(channels_last) and len(self.shape) == 3
        self.count = 0  # voxels written
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)  # sum of squared deviations

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    @property
    def nbytes(self) -> int:
        return self.channels * math.prod(self.shape) * self.dtype.itemsize

    def write(self, box: Box, tile: torch.Tensor, stats: bool = True) -> None:
        """Store ``tile`` (1, C, *box) at ``box`` and merge its channel statistics (Chan et al.'s pairwise update:
        float32 mean and centred sum of squares per tile, float64 across tiles); ``stats=False``: only store it
        (an activation no norm reads)."""
        if not stats:
            self._put(box, tile)
            return
        tile_mean, tile_m2, n = channel_stats(tile, self.channels_last and tile.ndim == 5)
        total = self.count + n
        delta = tile_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += tile_m2 + delta.square() * (self.count * n / total)
        self.count = total
        self._put(box, tile)

    def reset_stats(self) -> None:
        """Forget the statistics (the store is about to be overwritten, tile by tile)."""
        self.count = 0
        self.mean.zero_()
        self.m2.zero_()

    def group_stats(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, variance) of ``norm``'s groups over the whole volume, float64."""
        return group_moments(self.mean, self.m2, self.count, norm.num_groups)

    def read(self, box: Box) -> torch.Tensor:
        """The tile (1, C, *box), dense in the store's memory format."""
        raise NotImplementedError

    def _put(self, box: Box, values: torch.Tensor) -> None:
        raise NotImplementedError

    def tensor(self) -> torch.Tensor:
        return self.read(tuple((0, n) for n in self.shape))

    def release_below(self, index: int) -> None:
        """The values before ``index`` on the first spatial axis will not be read again (memory may go now)."""

    def close(self) -> None:
        pass


class RamStore(Store):
    def __init__(self, channels, shape, dtype, device, channels_last: bool = False) -> None:
        super().__init__(channels, shape, dtype, device, channels_last)
        self.data = torch.empty(
            (1, channels, *self.shape), dtype=dtype, device=device, memory_format=self.memory_format
        )
        self.released_below = 0  # first-axis planes before this were given back (`release_below`)

    def view(self, box: Box) -> torch.Tensor:
        """The store's values on ``box``, (1, C, *box), without a copy."""
        if box[0][0] < self.released_below:
            raise RuntimeError(f"tiling: planes before {self.released_below} were released, {box} was asked for")
        return self.data[(slice(None),) + _slices(box)]

    def release_below(self, index: int) -> None:
        """Give back the pages of the planes before ``index`` where they are whole pages of their own: 3D
        channels-last stores on the CPU, whose first spatial axis is outermost in memory."""
        index = min(int(index), self.shape[0])
        if not self.channels_last or self.device.type != "cpu" or index <= self.released_below:
            return
        from napari_meddiff.runtime.memory import release_pages

        plane = self.data.stride(2) * self.data.element_size()
        start = self.data.data_ptr() + self.released_below * plane
        release_pages(start, (index - self.released_below) * plane)
        self.released_below = index

    def read(self, box: Box) -> torch.Tensor:  # a copy, as a file's tile: the same kernels, the same bits
        return self.view(box).contiguous(memory_format=self.memory_format)

    def _put(self, box: Box, values: torch.Tensor) -> None:
        self.view(box)[...] = values

    def close(self) -> None:
        self.data = None


_FILE_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}  # bf16: its bits


class FileStore(Store):
    """A store in a file, memory-mapped only while a tile is read or written (so it does not stay resident)."""

    def __init__(self, channels, shape, dtype, device, folder: Path, channels_last: bool = False) -> None:
        super().__init__(channels, shape, dtype, device, channels_last)
        if dtype not in _FILE_DTYPES:
            raise MeddiffError(f"cannot store {dtype} activations in a file")
        free = shutil.disk_usage(folder).free
        if self.nbytes > 0.9 * free:
            raise MeddiffError(
                f"tiled pass needs {self.nbytes / 2**30:.1f} GiB of disk in {folder} for an activation, "
                f"{free / 2**30:.1f} GiB free (set MEDDIFF_TILE_DIR to a larger disk)"
            )
        fd, name = tempfile.mkstemp(suffix=".act", dir=folder)
        os.ftruncate(fd, self.nbytes)
        os.close(fd)
        self.path = Path(name)

    def _map(self, mode: str) -> np.memmap:
        shape = (*self.shape, self.channels) if self.channels_last else (self.channels, *self.shape)
        return np.memmap(self.path, dtype=_FILE_DTYPES[self.dtype], mode=mode, shape=shape)

    def _index(self, box: Box) -> tuple[slice, ...]:
        spatial = tuple(slice(a, b) for a, b in box)
        return spatial + (slice(None),) if self.channels_last else (slice(None),) + spatial

    def read(self, box: Box) -> torch.Tensor:
        mapped = self._map("r")
        values = torch.from_numpy(np.array(mapped[self._index(box)])).view(self.dtype)
        del mapped
        if self.channels_last:  # (*box, C) in memory: a channels_last_3d view with the strides a RAM tile has
            d, h, w, c = values.shape  # (unsqueeze's batch stride would be C: trilinear upsampling then takes
            values = values.as_strided((1, c, d, h, w), (d * h * w * c, 1, h * w * c, w * c, c))  # another kernel)
            return values.to(self.device)
        return values.unsqueeze(0).to(self.device)

    def _put(self, box: Box, values: torch.Tensor) -> None:
        values = values[0].cpu()
        if self.channels_last:
            values = values.permute(1, 2, 3, 0)
        array = values.contiguous().view(torch.int16 if self.dtype == torch.bfloat16 else self.dtype).numpy()
        mapped = self._map("r+")
        mapped[self._index(box)] = array  # written back by the kernel: no sync per tile
        del mapped

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


# --- one tile of one step --------------------------------------------------------------------------


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of the tile ``x`` with whole-volume per-channel ``mean`` / ``var``, in the dtypes the module uses
    (per channel ``x * scale + shift``, as PyTorch's GroupNorm kernel computes it, here by `F.batch_norm`)."""
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    if hasattr(norm, "norm_float16"):  # MAISI's MaisiGroupNorm3D: float32 output [fp16, then the affine part]
        if not norm.norm_float16:
            return F.batch_norm(x.float(), mean.float(), var.float(), weight, bias, False, 0.0, norm.eps)
        y = F.batch_norm(x.float(), mean.float(), var.float(), None, None, False, 0.0, norm.eps).half()
        view = (1, -1) + (1,) * (x.ndim - 2)
        return y.mul_(weight.view(view)).add_(bias.view(view)) if norm.affine else y
    return F.batch_norm(x, mean.float(), var.float(), weight, bias, False, 0.0, norm.eps)


def _conv(conv: nn.Module, x: torch.Tensor, padding: Sequence[int] | None = None) -> torch.Tensor:
    """``conv`` with symmetric zero ``padding`` (default none: the caller padded), on oneDNN for fp32 3D on CPU
    like `cpu_kernels`."""
    padding = list(padding or [0] * (x.ndim - 2))
    if (
        x.ndim == 5
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
    ):
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), conv.weight, conv.bias, padding, list(conv.stride), list(conv.dilation), conv.groups
        )
    fn = F.conv3d if x.ndim == 5 else F.conv2d
    return fn(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


class Workspace:
    """One reusable buffer for the convolutions' padded input tiles (channels-last 3D), grown to the largest tile
    asked for and made anew only when the dtype changes (MAISI: float32 normalised inputs, bf16 upsampled ones),
    so that its pages are touched once per pass, not at every tile."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None

    def padded_input(
        self, channels: int, sizes: Sequence[int], zeros, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A (1, C, *padded) channels_last_3d tensor on the buffer whose ``zeros`` (before, after) border planes on
        each spatial axis are zero, and its uninitialised interior (1, C, *sizes), for the caller to fill."""
        padded = [n + lo + hi for n, (lo, hi) in zip(sizes, zeros)]
        numel = channels * math.prod(padded)
        if self.flat is None or self.flat.numel() < numel or self.flat.dtype != dtype or self.flat.device != device:
            self.flat = None
            self.flat = torch.empty(numel, dtype=dtype, device=device)
        x = self.flat[:numel].view(1, *padded, channels).permute(0, 4, 1, 2, 3)
        for axis, (lo, hi) in enumerate(zeros):
            if lo:
                x.narrow(axis + 2, 0, lo).zero_()
            if hi:
                x.narrow(axis + 2, padded[axis] - hi, hi).zero_()
        return x, x[(slice(None), slice(None)) + tuple(slice(lo, lo + n) for n, (lo, _) in zip(sizes, zeros))]


def _input_range(step: ConvStep, box: Box, src_shape: Sequence[int]):
    """Per spatial axis: the source box to read, the replicated edge (linear upsampling), the crop of the
    upsampled tile, and the zeros (before, after) the convolution's input needs at the volume's borders."""
    src_box, edge, crop, zeros = [], [], [], []
    for (a, b), n, k, s, (lo, _) in zip(box, src_shape, step.conv.kernel_size, step.conv.stride, step.pad):
        c, d = a * s - lo, (b - 1) * s - lo + k  # the convolution's input range (before its padding)
        n_pre = 2 * n if step.upsample else n
        c0, d0 = max(c, 0), min(d, n_pre)
        zeros.append((c0 - c, d - d0))
        if step.upsample == "nearest":
            s0, s1 = c0 // 2, (d0 - 1) // 2 + 1
            src_box.append((s0, s1))
            edge.append((0, 0))
            crop.append((c0 - 2 * s0, d0 - 2 * s0))
        elif step.upsample == "linear":  # one source voxel of context each side; replicate at the borders
            s0, s1 = c0 // 2 - 1, (d0 - 1) // 2 + 2
            src_box.append((max(s0, 0), min(s1, n)))
            edge.append((max(s0, 0) - s0, s1 - min(s1, n)))
            crop.append((c0 - 2 * s0, d0 - 2 * s0))
        else:
            src_box.append((c0, d0))
            edge.append((0, 0))
            crop.append((0, d0 - c0))
    return tuple(src_box), edge, crop, zeros


def _normalised_input(step: ConvStep, region: torch.Tensor, zeros, stats, workspace: Workspace) -> torch.Tensor:
    """``silu(norm(region))`` with its zero padding, written slab by slab (one plane of the first axis: it stays
    in cache) into the workspace: the convolution's whole input, in one pass through memory. ``region`` (1, C,
    *sizes) is a view of a store in memory or a tile read from a file: the same slabs, the same bits."""
    mean, var = (s.float() for s in stats[step.src])  # once, not at every slab
    x = inner = None
    for i in range(region.shape[2]):  # a dense slab: the channels-last kernel `read` gives file stores (same bits)
        plane = region[:, :, i : i + 1].contiguous(memory_format=torch.channels_last_3d)
        slab = _normalise(step.norm, plane, mean, var)
        if x is None:  # the normalised dtype (MAISI's norm may change it): the workspace's dtype
            x, inner = workspace.padded_input(region.shape[1], region.shape[2:], zeros, slab.dtype, slab.device)
        if step.silu:  # on the dense slab: into a strided view, SiLU runs PyTorch's scalar loop (other bits)
            slab = F.silu(slab, inplace=True)
        inner[:, :, i : i + 1] = slab
    return x


def _tile(
    step: ConvStep, stores: dict[str, Store], box: Box, stats, workspace: Workspace | None = None
) -> torch.Tensor:
    """The step's output on ``box`` (output coordinates), computed from the stores."""
    src = stores[step.src]
    src_box, edge, crop, zeros = _input_range(step, box, src.shape)
    if (
        workspace is not None
        and step.norm is not None
        and step.upsample is None
        and src.channels_last
        and all(b > a for a, b in src_box)
    ):
        region = src.view(src_box) if isinstance(src, RamStore) else src.read(src_box)
        y = _conv(step.conv, _normalised_input(step, region, zeros, stats, workspace))  # no copy of a RAM tile
    else:
        y = _conv_from_tile(step, src.read(src_box), edge, crop, zeros, stats, workspace if src.channels_last else None)
    if step.residual is not None:
        residual = stores[step.residual]
        if step.shortcut is None and isinstance(residual, RamStore) and residual.dtype == y.dtype:
            y.add_(residual.view(box))  # r + y, without copying the tile of r
        else:
            r = residual.read(box)
            if step.shortcut is not None:
                r = _conv(step.shortcut, r)
            y = y.add_(r) if r.dtype == y.dtype else r + y
    return y


def _conv_from_tile(
    step: ConvStep, x: torch.Tensor, edge, crop, zeros, stats, workspace: Workspace | None = None
) -> torch.Tensor:
    """The convolution of ``x``, the source tile read from its store, after its norm, SiLU and upsampling."""
    if step.norm is not None:
        x = _normalise(step.norm, x, *stats[step.src])
        if step.silu:
            x = F.silu(x, inplace=True)
    elif step.silu:
        x = F.silu(x)
    if step.upsample is not None:
        if step.upsample == "linear":
            if any(e != (0, 0) for e in edge):
                x = F.pad(x, [p for e in reversed(edge) for p in e], mode="replicate")
            x = F.interpolate(x, scale_factor=2.0, mode="trilinear" if x.ndim == 5 else "bilinear", align_corners=False)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = x[(slice(None), *_slices(tuple(crop)))]
    if workspace is not None and x.ndim == 5:
        # channels-last: into the zero-bordered buffer, as `_normalised_input`, so that every tile's convolution
        # (from RAM or a file) pads nothing itself: the same kernel, the same bits (and F.pad was slower)
        buffer, inner = workspace.padded_input(x.shape[1], x.shape[2:], zeros, x.dtype, x.device)
        inner.copy_(x)
        return _conv(step.conv, buffer)
    if all(lo == hi for lo, hi in zeros):  # interior tiles, or both borders: the convolution pads (no copy)
        return _conv(step.conv, x, [lo for lo, _ in zeros])
    return _conv(step.conv, F.pad(x, [p for z in reversed(zeros) for p in z]))


def tiles(shape: Sequence[int], tile: int) -> Iterator[Box]:
    """Boxes of at most ``tile`` voxels per side covering ``shape``, in C order."""
    return itertools.product(*[[(a, min(a + tile, n)) for a in range(0, n, tile)] for n in shape])


# --- running steps ---------------------------------------------------------------------------------


class _Stores:
    """Allocates stores in memory while they fit in ``ram_bytes``, in files after that."""

    def __init__(self, ram_bytes: float, device: torch.device, channels_last: bool = False) -> None:
        self.ram_bytes, self.device, self.channels_last = ram_bytes, device, channels_last
        self.stores: dict[str, Store] = {}
        self.folder: Path | None = None

    def ram_in_use(self) -> int:
        distinct = {id(s): s for s in self.stores.values()}.values()  # a store written over has two names
        return sum(s.nbytes for s in distinct if isinstance(s, RamStore))

    def new(self, name: str, channels: int, shape, dtype) -> Store:
        size = channels * math.prod(shape) * dtype.itemsize
        if self.device.type != "cpu" or self.ram_in_use() + size <= self.ram_bytes:
            store: Store = RamStore(channels, shape, dtype, self.device, self.channels_last)
        else:
            if self.folder is None:
                base = os.environ.get("MEDDIFF_TILE_DIR") or None
                self.folder = Path(tempfile.mkdtemp(prefix="meddiff-tiles-", dir=base))
            store = FileStore(channels, shape, dtype, self.device, self.folder, self.channels_last)
        self.stores[name] = store
        return store

    def free(self, name: str) -> None:
        self.stores.pop(name).close()

    def close(self) -> None:
        for name in list(self.stores):
            self.free(name)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _reuses_residual(step: ConvStep, i: int, last_use: dict[str, int], outputs: Sequence[str]) -> bool:
    """Whether ``step`` may write its output over its residual's store: each output tile adds the residual at
    the same box only (read before the write), and this step is the residual's last use."""
    r = step.residual
    return r is not None and r != step.src and r not in outputs and last_use.get(r) == i


def _residual_store(step: ConvStep, i: int, pool: _Stores, last_use, outputs, y: torch.Tensor, shape) -> Store | None:
    """The residual's store, emptied of statistics and also named ``step.out``, when the output can take its place
    (`_reuses_residual`, and the same channels, shape and dtype); else None."""
    if not _reuses_residual(step, i, last_use, outputs):
        return None
    store = pool.stores[step.residual]
    if (store.channels, store.shape, store.dtype) != (y.shape[1], tuple(shape), y.dtype):
        return None
    store.reset_stats()
    pool.stores[step.out] = store  # both names until the step ends (its tiles read the residual's name)
    return store


def _release_read(step: ConvStep, pool: _Stores, names: Sequence[str], next_box: Box, keep) -> None:
    """In the stores ``names`` that ``step`` reads for the last time, release the planes (first spatial axis)
    that no tile from ``next_box`` on reads: tiles go in C order, so a store's consumed planes can go while the
    step's output grows (the Zoo brain LDM's full-size decoding peaked at its 128-channel upsampled input plus two
    64-channel activations held whole)."""
    for name in names:
        store = pool.stores.get(name)
        if store is None or any(store is k for k in keep):
            continue
        needed = []
        if name == step.src:  # (a side output reads ``next_box`` of it: inside the input range, stride 1)
            needed.append(_input_range(step, next_box, store.shape)[0][0][0])
        if name == step.residual:
            needed.append(next_box[0][0])
        store.release_below(min(needed))


def _last_uses(steps: Sequence[ConvStep]) -> dict[str, int]:
    """Store name -> index of the last step that reads it (as its source or residual)."""
    return {name: i for i, step in enumerate(steps) for name in (step.src, step.residual) if name is not None}


def run_steps(
    steps: Sequence[ConvStep], x: torch.Tensor, src: str, outputs: Sequence[str], *, tile: int, ram_bytes: float
) -> list[torch.Tensor]:
    """Run ``steps`` on one sample ``x`` (1, C, *spatial) held in store ``src``; the ``outputs`` stores as tensors."""
    last_use = _last_uses(steps)
    spatial_convs = [s.conv.weight for s in steps if math.prod(s.conv.kernel_size) > 1]
    channels_last = (
        x.ndim == 5
        and any(not w.is_contiguous() for w in spatial_convs)  # the layout (`cpu_kernels`;
        and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in spatial_convs)
    )  # a
    # 1-channel input's weights are both layouts at once: they neither decide nor veto)
    pool = _Stores(ram_bytes, x.device, channels_last)
    workspace = Workspace()
    try:
        first = pool.new(src, x.shape[1], x.shape[2:], x.dtype)
        first.write(tuple((0, n) for n in x.shape[2:]), x)
        for i, step in enumerate(steps):
            source = pool.stores[step.src]
            stats = {step.src: source.group_stats(step.norm)} if step.norm is not None else {}
            shape = step.out_shape(source.shape)
            out: Store | None = None
            side: Store | None = None
            done = [n for n in {step.src, step.residual} - {None} if last_use.get(n) == i and n not in outputs]
            boxes = list(tiles(shape, tile))
            for k, box in enumerate(boxes):
                y = _tile(step, pool.stores, box, stats, workspace)
                if out is None:
                    out = _residual_store(step, i, pool, last_use, outputs, y, shape)
                    if out is None:
                        out = pool.new(step.out, y.shape[1], shape, y.dtype)
                out.write(box, y)
                if step.side is not None:
                    s = _conv(step.side, source.read(box))
                    side = side or pool.new(step.side_out, s.shape[1], shape, s.dtype)
                    side.write(box, s, stats=False)  # a residual only: no norm reads it
                if k + 1 < len(boxes) and boxes[k + 1][0] != box[0]:  # the next row of tiles starts
                    _release_read(step, pool, done, boxes[k + 1], keep=(out, side))
            for name in done:
                if pool.stores[name] is out:  # written over: only the name goes
                    del pool.stores[name]
                else:
                    pool.free(name)
        return [pool.stores[name].tensor() for name in outputs]
    finally:
        pool.close()


def _per_sample(steps, x: torch.Tensor, src: str, outputs, tile: int | None, ram_bytes: float | None):
    tile = int(tile or DEFAULT_TILE.get(x.ndim - 2, 64))
    if tile < 1:
        raise MeddiffError(f"tile must be a positive number of voxels, not {tile}")
    budget = float("inf") if ram_bytes is None else float(ram_bytes)
    per_sample = [run_steps(steps, x[b : b + 1], src, outputs, tile=tile, ram_bytes=budget) for b in range(x.shape[0])]
    return [torch.cat([sample[k] for sample in per_sample]) for k in range(len(outputs))]


def tiled_decode(
    autoencoder: nn.Module, z: torch.Tensor, *, tile: int | None = None, ram_bytes: float | None = None
) -> torch.Tensor:
    """``autoencoder.decode_stage_2_outputs(z)`` computed tile by tile (see the module docstring)."""
    steps, out = decoder_steps(autoencoder)
    (image,) = _per_sample(steps, z, "z", [out], tile, ram_bytes)
    return image


def tiled_encode(
    autoencoder: nn.Module, images: torch.Tensor, *, tile: int | None = None, ram_bytes: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``autoencoder.encode(images)`` -> (z_mu, z_sigma), computed tile by tile."""
    steps, mu, log_var = encoder_steps(autoencoder)
    z_mu, z_log_var = _per_sample(steps, images, "x", [mu, log_var], tile, ram_bytes)
    z_log_var = torch.clamp(z_log_var, -30.0, 20.0)
    return z_mu, torch.exp(z_log_var / 2)


def whole_pass_bytes(steps: Sequence[ConvStep], batch: int, spatial: Sequence[int]) -> float:
    """Estimated peak memory of a whole-volume pass: `WHOLE_PASS_ACTIVATIONS` of its largest fp32 activation
    (measured: 2.3 kB per output voxel for the Zoo brain LDM's decoder, 450 B for brain-ldm-3d's)."""
    shapes = {steps[0].src: tuple(spatial)}
    largest = 0
    for step in steps:
        shapes[step.out] = step.out_shape(shapes[step.src])
        channels_in = step.conv.in_channels
        largest = max(
            largest,
            step.conv.out_channels * math.prod(shapes[step.out]),
            channels_in * math.prod(2 * n for n in shapes[step.src]) if step.upsample else 0,
        )
    return float(WHOLE_PASS_ACTIVATIONS * 4 * batch * largest)


def tiled_store_bytes(steps: Sequence[ConvStep], spatial: Sequence[int], itemsize: int = 4) -> float:
    """Peak bytes of the activations a tiled pass stores at once (one sample, ``itemsize`` bytes per value)."""
    shapes = {steps[0].src: tuple(spatial)}
    sizes = {steps[0].src: steps[0].conv.in_channels * math.prod(spatial) * itemsize}
    last_use = _last_uses(steps)
    live, peak = dict(sizes), 0
    for i, step in enumerate(steps):
        shapes[step.out] = step.out_shape(shapes[step.src])
        size = step.conv.out_channels * math.prod(shapes[step.out]) * itemsize
        if _reuses_residual(step, i, last_use, ()) and live.get(step.residual) == size:
            live[step.out] = live.pop(step.residual)  # written over the residual's store
        else:
            live[step.out] = size
        if step.side is not None:
            live[step.side_out] = step.side.out_channels * math.prod(shapes[step.out]) * itemsize
        peak = max(peak, sum(live.values()))
        for name in {step.src, step.residual} - {None}:
            if last_use[name] == i:
                live.pop(name, None)
    return float(peak)
