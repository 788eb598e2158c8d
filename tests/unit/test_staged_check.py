"""The signer's check of staged bundles before `fleet model sign` signs them: a bundle that is not
the one the staged target describes gets nothing signed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO

import pytest

from device_client.protocol.bundle import build_bundle, file_sha256
from server.catalog.staged_check import StagedBundleMismatch, check_staged_bundles
from tests.helpers.bundles import FIELDS

PATH = "det/1.0.0/default/bundle.tar"


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A bundle as the server stores it."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx-bytes" * 100)
    val = tmp_path / "validation.npz"
    val.write_bytes(b"npz-bytes" * 10)
    bundle = tmp_path / "stored.tar"
    build_bundle(bundle, FIELDS, {"model.onnx": model, "validation.npz": val})
    return bundle


def staged(bundle: Path, **custom: object) -> dict:
    length, sha256 = file_sha256(bundle)
    fields = {"model": "det", "version": "1.0.0", "release": 1, "variant": "default", **custom}
    return {"path": PATH, "file": f"x.{PATH}", "length": length, "sha256": sha256, "custom": fields}


def check(tmp_path: Path, listed: list[dict], files: dict[str, Path]) -> list[str]:
    """Run the check with a download that serves ``files`` by target file name; returns what was
    downloaded."""
    fetched: list[str] = []

    def download(target: dict, fh: BinaryIO) -> None:
        fetched.append(target["file"])
        with open(files[target["file"]], "rb") as src:
            shutil.copyfileobj(src, fh)

    work = tmp_path / "work"
    work.mkdir()
    check_staged_bundles(listed, download, work)
    return fetched


def test_the_staged_bundle_passes(tmp_path: Path, stored: Path) -> None:
    target = staged(stored)
    files = {target["file"]: stored, "again": stored}
    assert check(tmp_path, [target, {**target, "file": "again"}], files) == [target["file"], "again"]


def test_a_swapped_bundle_is_refused(tmp_path: Path, stored: Path) -> None:
    target = staged(stored)
    data = bytearray(stored.read_bytes())
    data[-600] ^= 0xFF  # same length, other content
    swapped = tmp_path / "swapped.tar"
    swapped.write_bytes(bytes(data))
    with pytest.raises(StagedBundleMismatch, match="differs from its staged length or sha256; not signed"):
        check(tmp_path, [target], {target["file"]: swapped})


def test_a_bundle_that_does_not_extract_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    target = staged(garbage)  # the staged hashes are the garbage's own
    with pytest.raises(StagedBundleMismatch, match=r"not a valid bundle \(.+\); nothing signed"):
        check(tmp_path, [target], {target["file"]: garbage})


@pytest.mark.parametrize(
    "custom", [{"model": "other"}, {"version": "1.0.1"}, {"release": 2}, {"variant": "gpu"}]
)
def test_a_manifest_that_contradicts_its_target_is_refused(
    tmp_path: Path, stored: Path, custom: dict
) -> None:
    target = staged(stored, **custom)
    [(key, value)] = custom.items()
    with pytest.raises(StagedBundleMismatch, match=r"its manifest says .*; nothing signed") as caught:
        check(tmp_path, [target], {target["file"]: stored})
    assert f"'{key}': {value!r}" in str(caught.value).split("the target says")[1]


def test_the_first_bad_bundle_stops_the_check(tmp_path: Path, stored: Path) -> None:
    good = staged(stored)
    bad = {**staged(stored, release=7), "file": "bad"}
    with pytest.raises(StagedBundleMismatch):
        check(tmp_path, [bad, good], {"bad": stored})  # the good one is not even downloaded
