"""Bundle building and safe extraction (docs/architecture.md, "Model registry")."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from device_client.protocol import BundleError
from device_client.protocol.bundle import MANIFEST_MEMBER, build_bundle, extract_bundle
from tests.helpers.bundles import FIELDS


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx-bytes" * 100)
    val = tmp_path / "validation.npz"
    val.write_bytes(b"npz-bytes" * 10)
    return {"model.onnx": model, "validation.npz": val}


def test_build_and_extract_round_trip(tmp_path, parts):
    bundle = tmp_path / "b.tar"
    manifest = build_bundle(bundle, FIELDS, parts)
    assert set(manifest.members) == {"model.onnx", "validation.npz"}
    again = tmp_path / "again.tar"
    build_bundle(again, FIELDS, parts)
    assert again.read_bytes() == bundle.read_bytes()  # deterministic
    out = tmp_path / "out"
    got = extract_bundle(bundle, out)
    assert got == manifest
    assert (out / "model.onnx").read_bytes() == parts["model.onnx"].read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx", "validation.npz"]


def _rewrite(src: Path, dest: Path, mutate) -> None:
    """Copy a bundle tar, letting ``mutate(tar_out, members)`` add or change members."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
        mutate(tout, members)


def _add(tout, name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tout.addfile(info, io.BytesIO(data) if data else None)


def _copy_all(tout, members):
    for m, data in members:
        tout.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda t, ms: (_copy_all(t, ms), _add(t, "../evil", b"x")), "unsafe member path"),
        (lambda t, ms: (_copy_all(t, ms), _add(t, "/etc/evil", b"x")), "unsafe member path"),
        (lambda t, ms: (_copy_all(t, ms), _add(t, "sub/evil", b"x")), "not allowed"),
        (
            lambda t, ms: (_copy_all(t, ms), _add(t, "link", type=tarfile.SYMTYPE, linkname="/etc/passwd")),
            "link",
        ),
        (
            lambda t, ms: (_copy_all(t, ms), _add(t, "hard", type=tarfile.LNKTYPE, linkname="model.onnx")),
            "link",
        ),
        (lambda t, ms: (_copy_all(t, ms), _add(t, "dev", type=tarfile.CHRTYPE)), "non-regular"),
        (lambda t, ms: (_copy_all(t, ms), _add(t, "extra.bin", b"x")), "not listed"),
        (lambda t, ms: _copy_all(t, [m for m in ms if m[0].name != "validation.npz"]), "absent"),
        (lambda t, ms: _copy_all(t, [m for m in ms if m[0].name != MANIFEST_MEMBER]), "no bundle.json"),
    ],
)
def test_unsafe_or_inconsistent_bundles_are_refused(tmp_path, parts, mutation, message):
    good = tmp_path / "good.tar"
    build_bundle(good, FIELDS, parts)
    bad = tmp_path / "bad.tar"
    _rewrite(good, bad, mutation)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match=message):
        extract_bundle(bad, out)
    assert not any(out.iterdir())
    assert not (tmp_path / "evil").exists()


def test_tampered_member_same_length_is_refused(tmp_path, parts):
    good = tmp_path / "good.tar"
    build_bundle(good, FIELDS, parts)

    def flip(tout, members):
        for m, data in members:
            if m.name == "model.onnx":
                data = b"X" + data[1:]
            tout.addfile(m, io.BytesIO(data))

    bad = tmp_path / "bad.tar"
    _rewrite(good, bad, flip)
    with pytest.raises(BundleError, match=r"does not match bundle\.json hash"):
        extract_bundle(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_caps_truncation_and_garbage(tmp_path, parts):
    good = tmp_path / "good.tar"
    build_bundle(good, FIELDS, parts)
    with pytest.raises(BundleError, match="member cap"):
        extract_bundle(good, tmp_path / "o1", max_member_bytes=100)
    with pytest.raises(BundleError, match="total cap"):
        extract_bundle(good, tmp_path / "o2", max_total_bytes=1000)
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(BundleError):
        extract_bundle(truncated, tmp_path / "o3")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError, match="not a readable tar"):
        extract_bundle(garbage, tmp_path / "o4")


def test_bad_manifest_is_refused(tmp_path, parts):
    good = tmp_path / "good.tar"
    build_bundle(good, FIELDS, parts)

    def break_manifest(tout, members):
        for m, data in members:
            if m.name == MANIFEST_MEMBER:
                doc = json.loads(data)
                doc["version"] = "not-semver"
                data = json.dumps(doc).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))

    bad = tmp_path / "bad.tar"
    _rewrite(good, bad, break_manifest)
    with pytest.raises(BundleError, match=r"invalid bundle\.json"):
        extract_bundle(bad, tmp_path / "out")
