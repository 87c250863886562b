"""``meddiff fetch NAME``: download a MONAI Model Zoo bundle (``monai.bundle.download``) and check its md5s.

Only files are downloaded and hashed; nothing in the bundle is run. Offline, the error lists the files the
bundle folder must hold and their md5 (``large_files.yml``), so they can be copied in by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import ensure_folder, removed_if_left_empty
from napari_meddiff.models.boundary import shorten
from napari_meddiff.models.bundle import FORMAT as BUNDLE
from napari_meddiff.models.bundle import read_large_files
from napari_meddiff.models.bundle_weights import file_digests
from napari_meddiff.models.zoo_bundles import ZOO_BUNDLES, bundle_defaults

SOURCES = ("monaihosting", "github", "huggingface_hub", "ngc")
# large_files.yml entries no meddiff task reads, fetched only with --all-files: MAISI's mask generator, its
# candidate-mask database and its datasets (several GB; generating from a given label map needs none of them)
OPTIONAL_PREFIXES = ("models/mask_generation_", "configs/candidate_masks_", "datasets/")
# a bundle name or version becomes a folder or file name under --dir (and part of a URL): one plain name, no
# separators, no leading dot (no "..", no hidden files)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")


def register(sub: argparse._SubParsersAction) -> None:
    known = ", ".join(sorted(ZOO_BUNDLES))
    p = sub.add_parser(
        "fetch",
        help="download a MONAI Model Zoo bundle",
        description=f"Download a MONAI Model Zoo bundle with monai.bundle.download into DIR/NAME and check the md5 "
        f"of its weights (large_files.yml). Bundles with documented defaults: {known}.",
    )
    p.add_argument("name", help="bundle name, e.g. brain_image_synthesis_latent_diffusion_model")
    p.add_argument(
        "--dir",
        default=None,
        help="folder to put the bundle in (default: the first folder of $MEDDIFF_MODELS)",
    )
    p.add_argument("--version", default=None, help="bundle version (default: the latest)")
    p.add_argument("--source", choices=SOURCES, default="monaihosting", help="where from (default monaihosting)")
    p.add_argument(
        "--all-files",
        action="store_true",
        help="also the large files no meddiff task reads (MAISI's mask generator, mask database and datasets)",
    )
    p.set_defaults(func=run)


def is_optional(rel: str) -> bool:
    """A large file that no meddiff task reads (see `OPTIONAL_PREFIXES`)."""
    return str(rel).startswith(OPTIONAL_PREFIXES)


def _plain(value: str, what: str) -> str:
    if not PLAIN_NAME.fullmatch(value):
        raise MeddiffError(
            f"{what} {shorten(value)!r} is not a plain name: letters, digits, '_', '-' and '.' (not first), "
            "at most 100, no path separators"
        )
    return value


def _target_dir(arg: str | None) -> Path:
    if arg is not None:
        if not arg.strip():
            raise MeddiffError("--dir must name a folder (it is empty)")
        root, what = Path(arg).expanduser(), "--dir"
    else:
        paths = [p for p in os.environ.get("MEDDIFF_MODELS", "").split(os.pathsep) if p.strip()]
        if not paths:
            raise MeddiffError("give --dir DIR (or set MEDDIFF_MODELS): where to put the bundle")
        root, what = Path(paths[0]).expanduser(), "the first folder of MEDDIFF_MODELS,"
    if root.exists() and not root.is_dir():
        raise MeddiffError(f"{what} {shorten(root)} is not a folder")
    return root


def check_files(bundle: Path, *, differing_only: bool = False) -> list[str]:
    """Problems with the bundle's weight files (missing, md5 mismatch); empty when all are good.

    Strict, unlike loading (which only warns): what is fetched must be the published file."""
    problems = []
    for rel, md5 in read_large_files(bundle, bundle_defaults(bundle.name)).items():
        path = bundle / rel
        if not path.is_file():
            if not differing_only and not is_optional(rel):
                problems.append(f"{rel}: missing")
        elif (got := file_digests(path)[0]) != md5.lower():
            problems.append(f"{rel}: md5 {got} != {md5} in large_files.yml (damaged, another version, or fine-tuned)")
    return problems


def expected_files(bundle: Path) -> str:
    files = read_large_files(bundle, bundle_defaults(bundle.name))
    parts = ["configs/inference.json (or .yaml)", "configs/metadata.json"]
    parts += [f"{rel} (md5 {md5})" for rel, md5 in files.items()] or ["the weight files of its large_files.yml"]
    return f"{bundle}/ holding " + ", ".join(parts)


def _download(name: str, root: Path, version: str | None, source: str, all_files: bool) -> list[str]:
    """The bundle and the large files it lacks; returns the large files left out (see `_download_large_files`)."""
    import monai.bundle

    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))  # monai.bundle logs its arguments at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            monai.bundle.download(name=name, version=version, bundle_dir=str(root), source=source, progress=False)
            return _download_large_files(root / name, all_files) if check_files(root / name) else []
    finally:
        logging.disable(previous)


def _download_large_files(bundle: Path, all_files: bool) -> list[str]:
    """Each missing file of the bundle's large_files.yml (`large_file_entries`: paths inside the bundle) with
    MONAI's ``download_url`` and its hash check, but those no task reads unless ``all_files``; returns those."""
    from monai.apps import download_url

    from napari_meddiff.models.bundle import large_file_entries

    left_out = []
    for entry in large_file_entries(bundle):
        if not entry.get("url"):
            continue
        rel = str(entry.get("path"))
        target = bundle / rel
        if target.is_file():
            continue
        if is_optional(rel) and not all_files:
            left_out.append(rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        hashed = (
            {"hash_val": entry["hash_val"], "hash_type": entry.get("hash_type", "md5")} if entry.get("hash_val") else {}
        )
        download_url(url=str(entry["url"]), filepath=target, progress=False, **hashed)
    return left_out


def run(args: argparse.Namespace) -> int:
    _plain(args.name, "bundle name")
    if args.version is not None:
        _plain(args.version, "--version")
    root = _target_dir(args.dir)
    bundle = root / args.name
    if bundle.is_dir() and BUNDLE.detect(bundle):
        if not check_files(bundle):
            print(f"{bundle}: already there, every weight file's md5 checked", file=sys.stderr)
            return 0
        differing = check_files(bundle, differing_only=True)
        if differing:  # a download would overwrite the bundle's files, or stop at MONAI's hash check
            raise MeddiffError(
                f"{bundle}: " + "; ".join(differing) + ": not downloading over it; move the file away to fetch the "
                "published one (the folder loads as it is, with a warning)"
            )
    with removed_if_left_empty(root):
        ensure_folder(root)
        _fetch(args.name, root, args.version, args.source, args.all_files)
    return _verify(bundle)


def _fetch(name: str, root: Path, version: str | None, source: str, all_files: bool = False) -> None:
    bundle = root / name
    try:
        left_out = _download(name, root, version, source, all_files)
    except MeddiffError:  # what was downloaded is refused (a large_files.yml path out of the bundle): as it is
        raise
    except Exception as exc:  # network errors come from urllib, requests, huggingface_hub, ...
        raise MeddiffError(
            f"cannot download bundle {name!r} ({download_failure(exc)}). Without internet, copy it in "
            f"by hand: {expected_files(bundle)}; then `meddiff fetch {name} --dir {root}` checks the md5s"
        ) from None
    if left_out:
        print(f"{name}: not downloaded, as no meddiff task reads them (--all-files fetches them): "
              + ", ".join(left_out), file=sys.stderr)  # fmt: skip


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>:?\s*")
_CAUSED_BY = re.compile(r"\(Caused by (\w+)\((.*)\)\)\s*$")
_URL_HOST = re.compile(r"host='([^']+)'")
MAX_REASON = 240


def download_failure(exc: BaseException) -> str:
    """Why a download failed, as one complete line: urllib3's nested ``(Caused by NewConnectionError("<...
    object at 0x...>: Failed to resolve 'host' ([Errno -2] ...)"))`` becomes ``NameResolutionError: cannot
    reach github.com: Failed to resolve 'github.com' ([Errno -2] Name or service not known)``; a message too
    long for a line is cut at a word, with an ellipsis, never inside a parenthesis left open."""
    text = " ".join(str(exc).split())
    kind = type(exc).__name__
    caused = _CAUSED_BY.search(text)
    if caused:
        host = _URL_HOST.search(text)
        kind = caused.group(1)
        detail = _OBJECT_REPR.sub("", caused.group(2)).strip().strip("'\"").strip()
        text = (f"cannot reach {host.group(1)}: " if host else "") + (detail or kind)
    text = _OBJECT_REPR.sub("", text).strip() or "no message"
    if len(text) > MAX_REASON:
        cut = text[:MAX_REASON].rsplit(" ", 1)[0]
        opened: list[int] = []
        for i, ch in enumerate(cut):
            if ch == "(":
                opened.append(i)
            elif ch == ")" and opened:
                opened.pop()
        if opened:  # back off to before the first parenthesis the cut leaves open
            cut = cut[: opened[0]].rstrip()
        text = cut + " …"
    return f"{kind}: {text}"


def _verify(bundle: Path) -> int:
    if not BUNDLE.detect(bundle):
        raise MeddiffError(f"{bundle}: downloaded, but it is no bundle (no configs/inference.json + metadata.json)")
    problems = check_files(bundle)
    if problems:
        raise MeddiffError(f"{bundle}: downloaded, but " + "; ".join(problems))
    print(f"{bundle}: downloaded, every weight file's md5 checked; use it with --model {bundle}", file=sys.stderr)
    return 0
