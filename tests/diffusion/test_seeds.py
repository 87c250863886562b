"""Seeds and their noise (`diffusion.seeds`): noise drawn by CPU generators for every device; seeds stay within
0..2**63-1, a seed range included."""

from __future__ import annotations

import pytest
import torch

import napari_meddiff as md
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.errors import MeddiffError
from tests.helpers import assert_one_line_error, run_cli


def test_noise_comes_from_cpu_generators():
    gens = seeded_generators([11, 12], torch.device("cpu"))
    assert all(g.device.type == "cpu" for g in gens)
    noise = initial_noise((2, 4, 4), gens, torch.device("cpu"))
    again = torch.stack([torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    assert torch.equal(noise, again)


def test_seed_range_must_stay_in_range(cli_env, tmp_path):
    proc = run_cli(
        "generate",
        "--model",
        "tiny-ldm-3d",
        "--seed",
        str(2**63 - 1),
        "--num",
        "2",
        "--out",
        tmp_path / "o",
        env=cli_env,
    )
    assert_one_line_error(proc, "out of range")
    with pytest.raises(MeddiffError, match="out of range"):
        md.generate("tiny-ldm-3d", [-1], steps=1, device="cpu")
