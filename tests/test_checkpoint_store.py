"""benchmarks/checkpoints.sh: training checkpoints on their own branch, off main's tree and index."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoints.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _store(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(k, v)
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-qm", "code")
    return tmp_path


def test_save_and_restore_keep_main_untouched_and_replace_not_accumulate(repo):
    ckpt = repo / "runs" / "ae.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(5000))
    head, status = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain")
    r = _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 10")
    assert r.returncode == 0, r.stderr
    assert _git(repo, "rev-parse", "HEAD") == head and _git(repo, "status", "--porcelain") == status
    assert _git(repo, "ls-files") == "code.py"  # nothing staged on main

    first = ckpt.read_bytes()
    ckpt.write_bytes(os.urandom(6000))
    assert _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 20").returncode == 0
    assert _git(repo, "ls-tree", "-r", "--name-only", "checkpoints") == "brain/ae.ckpt"
    assert _git(repo, "rev-list", "--count", "checkpoints") == "2"

    out = repo / "restored" / "ae.pt"
    r = _store(repo, "restore", "brain/ae.ckpt", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ckpt.read_bytes() != first
    listing = _store(repo, "list")
    assert listing.returncode == 0 and "brain/ae.ckpt" in listing.stdout and "step 20" in listing.stdout


def test_restore_refuses_to_overwrite_and_names_a_missing_checkpoint(repo):
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"weights")
    assert _store(repo, "save", str(ckpt), "ae.ckpt", "first").returncode == 0
    r = _store(repo, "restore", "ae.ckpt", str(ckpt))
    assert r.returncode != 0 and "not overwritten" in r.stderr and ckpt.read_bytes() == b"weights"
    r = _store(repo, "restore", "other.ckpt", str(repo / "x.pt"))
    assert r.returncode != 0 and "not on branch" in r.stderr and not (repo / "x.pt").exists()


def test_a_fresh_clone_reads_and_extends_the_branch_from_origin(repo, tmp_path):
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"step 10")
    assert _store(repo, "save", str(ckpt), "ae.ckpt", "step 10").returncode == 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    r = _store(clone, "restore", "ae.ckpt", str(clone / "runs" / "ae.pt"))
    assert r.returncode == 0, r.stderr
    assert (clone / "runs" / "ae.pt").read_bytes() == b"step 10"
    (clone / "new.pt").write_bytes(b"step 20")
    assert _store(clone, "save", str(clone / "new.pt"), "ae.ckpt", "step 20").returncode == 0
    assert _git(clone, "rev-list", "--count", "checkpoints") == "2"  # on top of origin's history
