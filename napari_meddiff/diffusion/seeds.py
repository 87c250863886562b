"""Seeds and the noise they draw. Seeds: non-negative integers below 2**63 (torch generators take 64 bits, but
-1 would silently alias 2**64 - 1; keeping to int64's positive range makes every seed mean one thing everywhere)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

from napari_meddiff.errors import MeddiffError

MAX_SEED = 2**63 - 1


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):  # Python and numpy integers, not floats
        raise MeddiffError(f"a seed must be an integer, got {seed!r}")
    value = operator.index(seed)
    if not 0 <= value <= MAX_SEED:
        raise MeddiffError(f"seed {value} is out of range: seeds are integers from 0 to 2**63-1 ({MAX_SEED})")
    return value


def check_seeds(seeds: Iterable[object]) -> list[int]:
    return [check_seed(s) for s in seeds]


def seed_range(first: int, count: int) -> list[int]:
    """Seeds ``first .. first + count - 1``, all in range."""
    if count < 1:
        raise MeddiffError(f"the number of seeds must be at least 1, got {count}")
    check_seed(first)
    check_seed(first + count - 1)
    return list(range(first, first + count))


def seeded_generators(seeds: Sequence[int], device: torch.device | None = None) -> list[torch.Generator]:
    """One CPU generator per seed, whatever the device the chain runs on (``device`` is where the noise goes).

    Noise is drawn on the CPU and moved to the device, as diffusers' ``randn_tensor`` does: a seed gives the
    same initial noise, and the same noise in stochastic steps, on every device, so CPU and CUDA give the same
    sample up to floating-point error."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``(len(generators), *shape)`` on ``device``, each sample from its own generator
    (drawn where the generator lives, then moved)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)
