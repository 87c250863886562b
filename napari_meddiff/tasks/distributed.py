"""Sharded generation under torchrun: rank, device and collective checks of one process group."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from datetime import timedelta

from napari_meddiff.errors import MeddiffError


@dataclasses.dataclass
class DistContext:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 when started alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: object = None  # torch.device once the process group is up

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: dict | None = None) -> DistContext:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as set by torchrun (absent: a single process)."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise MeddiffError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if world < 1 or not 0 <= rank < world:
            raise MeddiffError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, world=world, local_rank=local_rank)


def rank_device(name: str, ctx: DistContext):
    """The device of this rank: ``cuda`` (or ``auto`` with CUDA) becomes ``cuda:LOCAL_RANK``."""
    import torch

    from napari_meddiff.runtime.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if ctx.local_rank >= count:
            raise MeddiffError(
                f"local rank {ctx.local_rank} has no GPU of its own ({count} visible); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", ctx.local_rank)
    return device


def init_distributed(ctx: DistContext, device, timeout_minutes: float = 60.0) -> DistContext:
    """Join the torchrun process group: NCCL for CUDA devices, gloo on CPU. A no-op for a single process."""
    if not ctx.distributed:
        return ctx
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}  # binds NCCL to this rank's GPU
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    ctx.backend = backend
    ctx.device = device
    return ctx


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_ok(ctx: DistContext, ok: bool) -> bool:
    """True when every rank says ``ok`` (an all-reduce, so it is also a barrier)."""
    if not ctx.distributed:
        return bool(ok)
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def teardown(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed(ctx: DistContext, device) -> Iterator[DistContext]:
    """``with distributed(ctx, device):`` init the process group (if under torchrun), destroy it on exit."""
    init_distributed(ctx, device)
    try:
        yield ctx
    finally:
        teardown(ctx)
