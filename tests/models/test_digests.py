"""Weight digests (`models.digests`) are remembered only while a file is unchanged; a bundle changed after a
remembered load is refused."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from napari_meddiff.models import digests, load_model
from napari_meddiff.testing.bundle_fixtures import write_bundle


def _age(path, seconds: float = 60.0) -> None:
    """Give a file an old modification time (as a downloaded bundle's weights have)."""
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_digests_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda p: calls.append(p) or real(p))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    _age(weights)
    first = digests.weight_digests(weights)
    assert first == real(weights) and len(calls) == 1
    assert digests.weight_digests(weights) == first and len(calls) == 1  # remembered
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size, and the old times put back: the change time still differs
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digests.weight_digests(weights) == real(weights) != first and len(calls) == 2


def test_fresh_files_are_not_remembered_and_cache_can_be_off(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 10)
    digests.weight_digests(weights)  # written just now: a same-tick rewrite could keep its times
    assert not (tmp_path / "cache" / digests.CACHE_FILE).exists()
    monkeypatch.setenv(digests.CACHE_ENV, "none")
    _age(weights)
    assert digests.weight_digests(weights) == digests.hash_file(weights)
    assert digests.cache_dir() is None and not (tmp_path / "cache").exists()
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / digests.CACHE_FILE).write_text("{not json")  # a broken cache is ignored and replaced
    assert digests.weight_digests(weights) == digests.hash_file(weights)
    assert str(weights.resolve()) in json.loads((tmp_path / "cache" / digests.CACHE_FILE).read_text())


def test_a_changed_bundle_file_is_noticed_after_a_remembered_load(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    bundle = tmp_path / "mednist_ddpm"
    write_bundle(bundle, "mednist", seed=1)
    weights = bundle / "models" / "model.pt"
    _age(weights)
    load_model(bundle)  # md5 checked and remembered
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # the remembered digest does not hide the change: the md5 is computed again and differs
    with pytest.warns(UserWarning, match="differs from the published file"):
        load_model(bundle)
    shutil.rmtree(tmp_path / "cache")
