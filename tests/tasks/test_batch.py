"""Batch cohort generation (issue 8): partitioning, resume, manifests, shards and torchrun against one process.

Everything runs on CPU with one intra-op thread: oneDNN's batched convolutions round differently with 1 and 2
threads, so files are only byte-identical between runs with the same thread count (torchrun sets
OMP_NUM_THREADS=1 per worker; the in-process runs here use ``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_meddiff.cli import main
from napari_meddiff.tasks import batch, distributed
from tests.helpers import run_cli

ARGS = ["--num", "5", "--seed", "3", "--sampler", "ddim", "--steps", "3", "--batch-size", "2"]
SEEDS = list(range(3, 8))
NAME = "tiny-ldm-3d"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """The single-process run every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["generate", "--model", str(tiny_models["ldm3d"]), *ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*.nii.gz"))}


def manifest_without_seconds(folder: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in batch.read_manifest(folder / "cohort.csv")]


def assert_same_cohort(a: Path, b: Path) -> None:
    """Same files, same bytes (so same voxels), same manifest up to timings."""
    ia, ib = images(a), images(b)
    assert list(ia) == list(ib) == [f"{NAME}_seed{s}.nii.gz" for s in SEEDS]
    assert sorted(p.name for p in a.glob("*.json")) == sorted(p.name for p in b.glob("*.json"))
    for name in ia:
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(str(ia[name])).dataobj), np.asanyarray(nib.load(str(ib[name])).dataobj)
        )
        assert sha(ia[name]) == sha(ib[name]), name
    assert manifest_without_seconds(a) == manifest_without_seconds(b)
    assert not [p for p in list(a.iterdir()) + list(b.iterdir()) if ".part" in p.name]


# --- units ----------------------------------------------------------------------------------------------------


def test_partition_covers_every_seed_once_in_fixed_blocks():
    seeds = list(range(10, 33))
    for bs in (1, 2, 3, 5):
        full = batch.seed_blocks(seeds, bs)
        for n in (1, 2, 3, 7):
            for world in (1, 2, 4):
                parts = [
                    batch.partition(seeds, bs, shard=(i, n), rank=r, world=world)
                    for i in range(n)
                    for r in range(world)
                ]
                blocks = [b for part in parts for b in part]
                assert sorted(map(tuple, blocks)) == sorted(map(tuple, full))  # same blocks, each exactly once
    # batch size 1: the strided split of the brief, seeds[shard::n][rank::world]
    assert [b[0] for b in batch.partition(seeds, 1, shard=(1, 3), rank=1, world=2)] == seeds[1::3][1::2]


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_parse_shard_rejects(text):
    with pytest.raises(batch.MeddiffError):
        batch.parse_shard(text)


def test_dist_context_from_env():
    assert distributed.DistContext.from_env({}) == distributed.DistContext(0, 1, 0)
    ctx = distributed.DistContext.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.distributed, ctx.is_main) == (3, 4, 1, True, False)
    with pytest.raises(batch.MeddiffError):
        distributed.DistContext.from_env({"RANK": "4", "WORLD_SIZE": "4"})


# --- batching ---------------------------------------------------------------------------------------------------


def test_batched_equals_one_at_a_time(tiny_models, one_thread):
    """Batch 2 and 4 against one at a time, for an LDM (3D convs + decoder) and a pixel DDPM.

    Not bitwise for the LDM: for batch 1, PyTorch runs 3D convolutions whose N*C*D*H <= 20480 with its native
    im2col+GEMM kernel (slow_conv3d) and everything else with oneDNN, which accumulates in another order. The
    differences are a few float32 ulps (max 2e-6 measured on images in [0, 1]), so the tolerance is 1e-5
    absolute; every batch size >= 2 goes through oneDNN and agrees bit for bit (checked below).
    """
    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.generate import generate

    for key in ("ldm3d", "ddpm3d"):
        model = load_model(tiny_models[key])
        seeds = [0, 1, 2, 3]
        kwargs = dict(sampler="ddim", steps=3, device="cpu")
        one = [generate(model, [s], **kwargs)[0].array for s in seeds]
        two = [v.array for v in generate(model, seeds, batch_size=2, **kwargs)]
        four = [v.array for v in generate(model, seeds, batch_size=4, **kwargs)]
        for a, b, c in zip(one, two, four):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
            np.testing.assert_array_equal(b, c)
        assert np.abs(one[0] - one[1]).max() > 0.1  # different seeds really differ


# --- resume -----------------------------------------------------------------------------------------------------


def test_resume_regenerates_only_missing_or_corrupt(tiny_models, reference, tmp_path, one_thread, capsys):
    out = tmp_path / "resume"
    shutil.copytree(reference, out)
    model = str(tiny_models["ldm3d"])
    original = {name: sha(p) for name, p in images(out).items()}
    untouched = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / f"{NAME}_seed4.nii.gz").unlink()  # deleted (its block-mate seed 3 stays valid)
    corrupt = out / f"{NAME}_seed6.nii.gz"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))  # damaged in place: same name, wrong sha256
    (out / f"{NAME}_seed7.json").unlink()  # an image whose sidecar never got written
    stray = out / f".{NAME}_seed5.nii.gz.abc123.part.nii.gz"  # left by a killed writer
    stray.write_bytes(b"\x1f\x8b partial")
    (out / "cohort.csv").unlink()
    capsys.readouterr()

    assert main(["generate", "--model", model, *ARGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    written = sorted(Path(line).name for line in captured.out.split())
    assert written == [f"{NAME}_seed4.nii.gz", f"{NAME}_seed6.nii.gz", f"{NAME}_seed7.nii.gz"]
    assert "sha256 does not match" in captured.err and "no sidecar" in captured.err
    assert "exists, skipping" in captured.err
    for name in (f"{NAME}_seed3.nii.gz", f"{NAME}_seed3.json", f"{NAME}_seed5.nii.gz", f"{NAME}_seed5.json"):
        assert (out / name).stat().st_mtime_ns == untouched[name]  # valid subjects left alone
    assert not stray.exists()
    assert {name: sha(p) for name, p in images(out).items()} == original  # regenerated bit for bit
    assert_same_cohort(reference, out)
    # nothing to do now
    assert main(["generate", "--model", model, *ARGS, "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""


def test_other_settings_refused_not_mixed(tiny_models, reference, tmp_path, capsys):
    out = tmp_path / "mixed"
    shutil.copytree(reference, out)
    args = list(ARGS)
    args[args.index("--steps") + 1] = "4"
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_models["ldm3d"]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "generated with other settings: steps=3 (now 4)" in err and len(err.strip().splitlines()) == 1
    assert {name: sha(p) for name, p in images(out).items()} == {name: sha(p) for name, p in images(reference).items()}


# --- scale out ----------------------------------------------------------------------------------------------------


def test_shards_union_equals_single_run(tiny_models, reference, tmp_path, one_thread, capsys):
    out = tmp_path / "shards"
    model = str(tiny_models["ldm3d"])
    assert main(["generate", "--model", model, *ARGS, "--shard", "1/2", "--out", str(out)]) == 0
    assert not (out / "cohort.csv").exists()  # the cohort is not complete yet
    assert "--merge-manifest" in capsys.readouterr().err
    shard1 = {p.name for p in out.iterdir()}
    # blocks of 2: [3, 4] [5, 6] [7] -> shard 1 gets [5, 6]
    assert shard1 == {f"{NAME}_seed{s}.{ext}" for s in (5, 6) for ext in ("nii.gz", "json")}
    assert main(["generate", "--model", model, *ARGS, "--shard", "0/2", "--out", str(out)]) == 0
    assert_same_cohort(reference, out)  # the shard that completes the cohort wrote cohort.csv
    meta = json.loads((out / f"{NAME}_seed5.json").read_text())
    assert meta["shard"] == "1/2" and meta["sha256"] == sha(out / f"{NAME}_seed5.nii.gz")


def test_merge_manifest(reference, tmp_path, capsys):
    out = tmp_path / "merge"
    shutil.copytree(reference, out)
    (out / "cohort.csv").unlink()
    assert main(["generate", "--merge-manifest", str(out)]) == 0
    assert_same_cohort(reference, out)
    damaged = out / f"{NAME}_seed4.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:-10])  # truncated
    capsys.readouterr()
    assert main(["generate", "--merge-manifest", str(out)]) == 1
    assert f"{NAME}_seed4.nii.gz: sha256 does not match" in capsys.readouterr().err
    assert [row["seed"] for row in batch.read_manifest(out / "cohort.csv")] == ["3", "5", "6", "7"]


def test_torchrun_two_processes_equal_one(tiny_models, reference, tmp_path):
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEDDIFF_MODELS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "napari_meddiff.cli",
            "--",
            "generate",
            "--model",
            str(tiny_models["ldm3d"]),
            *ARGS,
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_cohort(reference, out)
    ranks = {s: json.loads((out / f"{NAME}_seed{s}.json").read_text())["rank"] for s in SEEDS}
    assert ranks == {3: 0, 4: 0, 5: 1, 6: 1, 7: 0}  # whole blocks of 2, strided over the 2 ranks
    assert all(json.loads((out / f"{NAME}_seed{s}.json").read_text())["world_size"] == 2 for s in SEEDS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2", "--out", "{tmp}/o"], "need 0 <= i < n"),
        (["--shard", "x", "--out", "{tmp}/o"], "--shard must look like i/n"),
        (["--batch-size", "0", "--out", "{tmp}/o"], "--batch-size must be at least 1"),
        ([], "--out is required"),
        (["--merge-manifest", "{tmp}/nowhere"], "not a folder"),
    ],
)
def test_bad_batch_options_one_line_error(tiny_models, tmp_path, capsys, args, message):
    argv = ["generate", "--model", str(tiny_models["ldm3d"]), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_merge_flags_mixed_settings(tiny_models, reference, tmp_path, one_thread, capsys):
    out = tmp_path / "mixed-merge"
    shutil.copytree(reference, out)
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_models["ldm3d"]),
                "--num",
                "1",
                "--seed",
                "8",
                "--sampler",
                "ddim",
                "--steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )  # new seed, other steps: allowed, but flagged
    capsys.readouterr()
    assert main(["generate", "--merge-manifest", str(out)]) == 1
    assert "different settings" in capsys.readouterr().err
    assert len(batch.read_manifest(out / "cohort.csv")) == 6


# --- the sidecars a command writes are valid JSON (issue 13) ------------------------------------------------------


def test_sidecar_json_is_valid_after_generate(cli_env, tmp_path):
    out = tmp_path / "g"
    assert (
        run_cli(
            "generate", "--model", "tiny-ldm-3d", "--steps", "1", "--seed", "3", "--out", out, env=cli_env
        ).returncode
        == 0
    )
    meta = json.loads((out / "tiny-ldm-3d_seed3.json").read_text())
    assert meta["seed"] == 3
