"""benchmarks/checkpoints.sh: training checkpoints in a store outside git (runs/checkpoints), never committed;
checkpoints that earlier versions stored in main's history are still restored from there."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "checkpoints.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _store(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=repo, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for k, v in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MEDDIFF_CHECKPOINTS", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("/runs/\n")  # as the project's
    _git(repo, "add", "code.py", ".gitignore")
    _git(repo, "commit", "-qm", "code")
    return repo


def _save_in_history(repo: Path, data: bytes, name: str, message: str) -> None:
    """What the earlier checkpoints.sh did: a commit adding .checkpoints/NAME, then one taking it out."""
    blob = (
        subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, input=data, check=True, capture_output=True)
        .stdout.decode()
        .strip()
    )
    head = _git(repo, "rev-parse", "HEAD")
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "tmp-index")}
    for args in (["read-tree", head], ["update-index", "--add", "--cacheinfo", f"100644,{blob},.checkpoints/{name}"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=repo, env=env, check=True, capture_output=True, text=True)
    with_it = _git(repo, "commit-tree", tree.stdout.strip(), "-p", head, "-m", f"checkpoint {name}: {message}")
    without = _git(repo, "commit-tree", f"{head}^{{tree}}", "-p", with_it, "-m", f"checkpoint {name} out")
    _git(repo, "update-ref", "HEAD", without)
    os.remove(repo / ".git" / "tmp-index")


def test_save_copies_into_the_ignored_store_and_commits_nothing(repo):
    ckpt = repo / "runs" / "ae.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(5000))
    (repo / "code.py").write_text("x = 2\n")
    _git(repo, "add", "code.py")  # a staged change stays staged
    head, status = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain", "--ignored")
    r = _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 10")
    assert r.returncode == 0, r.stderr
    assert _git(repo, "rev-parse", "HEAD") == head and _git(repo, "rev-list", "--count", "--all") == "1"
    assert _git(repo, "status", "--porcelain", "--ignored") == status  # runs/ was ignored already
    assert _git(repo, "ls-files") == ".gitignore\ncode.py"
    stored = repo / "runs" / "checkpoints" / "brain" / "ae.ckpt"
    assert stored.read_bytes() == ckpt.read_bytes()

    ckpt.write_bytes(os.urandom(6000))  # a later save of the same name replaces it
    assert _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 20").returncode == 0
    assert stored.read_bytes() == ckpt.read_bytes() and _git(repo, "rev-list", "--count", "--all") == "1"

    out = repo / "restored" / "ae.pt"
    r = _store(repo, "restore", "brain/ae.ckpt", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ckpt.read_bytes()
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
    assert r.returncode != 0 and "neither in" in r.stderr and not (repo / "x.pt").exists()


def test_a_store_in_the_repository_must_be_ignored_and_another_folder_can_be_named(repo, tmp_path):
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"step 10")
    r = _store(repo, "save", str(ckpt), "ae.ckpt", "tracked?", env={"MEDDIFF_CHECKPOINTS": str(repo / "store")})
    assert r.returncode != 0 and "not ignored" in r.stderr and not (repo / "store").exists()
    elsewhere = tmp_path / "elsewhere"
    r = _store(repo, "save", str(ckpt), "ae.ckpt", "outside", env={"MEDDIFF_CHECKPOINTS": str(elsewhere)})
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "ae.ckpt").read_bytes() == b"step 10"
    out = repo / "runs" / "ae.pt"
    assert _store(repo, "restore", "ae.ckpt", str(out), env={"MEDDIFF_CHECKPOINTS": str(elsewhere)}).returncode == 0
    assert out.read_bytes() == b"step 10"


def test_checkpoints_kept_in_history_by_earlier_versions_are_still_restored(repo):
    _save_in_history(repo, b"old", "brain/ae.ckpt", "step 10")
    listing = _store(repo, "list")
    assert listing.returncode == 0 and "brain/ae.ckpt" in listing.stdout and "history, read only" in listing.stdout
    r = _store(repo, "restore", "brain/ae.ckpt", str(repo / "runs" / "ae.pt"))
    assert r.returncode == 0, r.stderr
    assert (repo / "runs" / "ae.pt").read_bytes() == b"old"
    ckpt = repo / "new.pt"
    ckpt.write_bytes(b"new")
    assert _store(repo, "save", str(ckpt), "brain/ae.ckpt", "step 20").returncode == 0  # the store's comes first
    r = _store(repo, "restore", "brain/ae.ckpt", str(repo / "runs" / "ae2.pt"))
    assert r.returncode == 0 and (repo / "runs" / "ae2.pt").read_bytes() == b"new"


def test_a_fresh_clone_of_main_restores_what_history_holds(repo, tmp_path):
    _save_in_history(repo, b"step 10", "ae.ckpt", "step 10")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--single-branch", "-b", "main", str(repo), str(clone)], check=True)
    assert not (clone / ".checkpoints").exists()
    r = _store(clone, "restore", "ae.ckpt", str(clone / "runs" / "ae.pt"))
    assert r.returncode == 0, r.stderr
    assert (clone / "runs" / "ae.pt").read_bytes() == b"step 10"


def test_found_through_a_merge_and_from_a_subfolder_and_names_are_exact(repo):
    _git(repo, "checkout", "-q", "-b", "side")
    _save_in_history(repo, b"side", "brain/ae.ckpt", "on a side branch")
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
    ckpt = repo / "ae.pt"
    ckpt.write_bytes(b"x")
    for name in ("a b.ckpt", "../up.ckpt", "./x.ckpt", "x.note"):
        r = _store(repo, "save", str(ckpt), name, "bad name")
        assert r.returncode != 0 and "bad checkpoint name" in r.stderr, name
