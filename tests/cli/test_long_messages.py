"""Issue #36 item 8: a long user string is not echoed whole: a 100,000-character ``--model`` (or any option value)
gives one error line of a readable length, the string cut with an ellipsis."""

from __future__ import annotations

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "a" * 100_000],
        ["generate", "--model", "a/" * 50_000],
        ["models", "--no-such-option", "b" * 100_000],
    ],
    ids=["name", "path", "argparse"],
)
def test_a_long_user_string_is_cut_in_the_error(tmp_path, args):
    proc = run_cli(*args, "--out", tmp_path / "out") if args[0] == "generate" else run_cli(*args)
    assert_one_line_error(proc, "…")
    assert len(proc.stderr) < 1000, len(proc.stderr)
    assert "characters)" in proc.stderr, proc.stderr[:300]  # the cut says how long the string was
