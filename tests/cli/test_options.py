"""Options shared by the sampling commands (`cli.options`): a bad --eta or --seed is one line, and nothing is
written."""

from __future__ import annotations

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("eta", ["-0.5", "1.5", "nan", "inf"])
def test_eta_out_of_range_is_refused(cli_env, tmp_path, eta):
    proc = run_cli(
        "generate",
        "--model",
        "tiny-ldm-3d",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--eta",
        eta,
        "--out",
        tmp_path / "o",
        env=cli_env,
    )
    assert_one_line_error(proc, "eta must be")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64 - 1), "1e3"])
def test_bad_seeds_are_one_line_errors(cli_env, tmp_path, seed):
    for command in (["generate", "--model", "tiny-ldm-3d"], ["cohort", "--num", "1"]):
        proc = run_cli(*command, "--seed", seed, "--out", tmp_path / "o", env=cli_env)
        assert_one_line_error(proc, "--seed")
