"""benchmarks/checkpoints.sh: training checkpoints in main's history, never in its working tree or index."""

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
    for k, v in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }.items():
        monkeypatch.setenv(k, v)
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-qm", "code")
    return tmp_path


def test_save_and_restore_keep_the_tree_and_index_untouched_and_replace_not_accumulate(repo):
    ckpt = repo / "runs" / "ae.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(5000))
    (repo / "code.py").write_text("x = 2\n")
    _git(repo, "add", "code.py")  # a staged change stays staged
    head, status = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain")
    r = _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 10")
    assert r.returncode == 0, r.stderr
    assert _git(repo, "rev-parse", "HEAD~2") == head and _git(repo, "status", "--porcelain") == status
    assert _git(repo, "rev-parse", "HEAD^{tree}") == _git(repo, "rev-parse", f"{head}^{{tree}}")
    assert _git(repo, "ls-files") == "code.py"
    assert _git(repo, "ls-tree", "-r", "--name-only", "HEAD~1") == ".checkpoints/brain/ae.ckpt\ncode.py"

    first = ckpt.read_bytes()
    ckpt.write_bytes(os.urandom(6000))
    assert _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 20").returncode == 0
    assert _git(repo, "rev-list", "--count", "HEAD") == "5"
    assert _git(repo, "ls-tree", "-r", "--name-only", "HEAD") == "code.py"

    out = repo / "restored" / "ae.pt"
    r = _store(repo, "restore", "brain/ae.ckpt", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ckpt.read_bytes() != first
    listing = _store(repo, "list")
    assert listing.returncode == 0 and "brain/ae.ckpt" in listing.stdout and "step 20" in listing.stdout
    assert "0.0 MB" in listing.stdout and listing.stdout.count("\n") == 1


def test_restore_refuses_to_overwrite_and_names_a_missing_checkpoint(repo):
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"weights")
    assert _store(repo, "list").returncode != 0
    assert _store(repo, "save", str(ckpt), "ae.ckpt", "first").returncode == 0
    r = _store(repo, "restore", "ae.ckpt", str(ckpt))
    assert r.returncode != 0 and "not overwritten" in r.stderr and ckpt.read_bytes() == b"weights"
    r = _store(repo, "restore", "other.ckpt", str(repo / "x.pt"))
    assert r.returncode != 0 and "not in this branch's history" in r.stderr and not (repo / "x.pt").exists()


def test_a_fresh_clone_of_main_alone_restores_it(repo, tmp_path):
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"step 10")
    assert _store(repo, "save", str(ckpt), "ae.ckpt", "step 10").returncode == 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--single-branch", "-b", "main", str(repo), str(clone)], check=True)
    assert not (clone / ".checkpoints").exists()
    r = _store(clone, "restore", "ae.ckpt", str(clone / "runs" / "ae.pt"))
    assert r.returncode == 0, r.stderr
    assert (clone / "runs" / "ae.pt").read_bytes() == b"step 10"


def test_found_through_a_merge_and_from_a_subfolder_and_names_are_exact(repo):
    _git(repo, "checkout", "-q", "-b", "side")
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"side")
    r = _store(repo, "save", str(ckpt), "brain/ae.ckpt", "on a side branch")
    assert r.returncode == 0 and "not main" in r.stderr
    _git(repo, "checkout", "-q", "main")
    (repo / "other.py").write_text("y = 1\n")
    _git(repo, "add", "other.py")
    _git(repo, "commit", "-qm", "other")
    _git(repo, "merge", "-q", "--no-ff", "-m", "merge side", "side")
    sub = repo / "pkg"
    sub.mkdir()
    r = subprocess.run(
        ["bash", str(SCRIPT), "restore", "brain/ae.ckpt", "out.pt"], cwd=sub, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (sub / "out.pt").read_bytes() == b"side"
    for name in ("brain", "brain/*", "../x"):  # a folder, a glob, outside the store
        r = _store(repo, "restore", name, str(repo / "x.pt"))
        assert r.returncode != 0 and not (repo / "x.pt").exists() and not (repo / "x.pt.part").exists(), name
    for name in ("a b.ckpt", "../up.ckpt", "./x.ckpt"):
        r = _store(repo, "save", str(ckpt), name, "bad name")
        assert r.returncode != 0 and "bad checkpoint name" in r.stderr, name
