"""Data-parallel training under torchrun: ranks, wrapping and agreeing to stop."""

from __future__ import annotations

import os

import torch

from napari_meddiff.training.stopping import STOP


class Dist:
    """torch.distributed when launched under torchrun (gloo on CPU, nccl on CUDA); a no-op otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        self.device = device  # NCCL reduces CUDA tensors only
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return net
        return torch.nn.parallel.DistributedDataParallel(net)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (keeps the ranks in step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


def stop_agreed(dist: Dist) -> bool:
    """After a loop left through ``STOP``: whether any rank was asked to stop (every rank calls this)."""
    return dist.any(STOP.requested)
