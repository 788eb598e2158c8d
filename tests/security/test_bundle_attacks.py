"""Hostile bundles that are correctly signed and listed (a compromised publishing pipeline holding
the targets key), against a real daemon serving clf 2.0.0: the safe extraction must refuse each
one before a byte of it lands on disk, and the device keeps serving.

protection: ``device_client.protocol.bundle.extract_bundle`` (``_check_member``): no absolute or
parent paths, no links, no devices, FIFOs or directories. Without it, ``tarfile`` would write
outside the slot, plant a link to a system file, or create a device node.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.helpers.bundles import make_bundle

pytestmark = pytest.mark.mqtt


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    info.devmajor, info.devminor = (1, 3) if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else (0, 0)
    return info, data


CASES = [
    ("parent", _member("../evil", data=b"pwned"), "unsafe member path '../evil'"),
    ("deep-parent", _member("a/../../evil", data=b"pwned"), "unsafe member path 'a/../../evil'"),
    ("absolute", _member("/tmp/fleet-evil", data=b"pwned"), "unsafe member path '/tmp/fleet-evil'"),
    (
        "symlink",
        _member("model.link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        "bundle contains a link: 'model.link'",
    ),
    ("hardlink", _member("hard", tarfile.LNKTYPE, linkname="model.onnx"), "bundle contains a link: 'hard'"),
    ("chardev", _member("null", tarfile.CHRTYPE), "bundle contains a non-regular member: 'null'"),
    ("blockdev", _member("sda", tarfile.BLKTYPE), "bundle contains a non-regular member: 'sda'"),
    ("fifo", _member("pipe", tarfile.FIFOTYPE), "bundle contains a non-regular member: 'pipe'"),
    ("directory", _member("sub", tarfile.DIRTYPE), "bundle contains a non-regular member: 'sub'"),
]


@pytest.mark.parametrize(("case", "member", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_bundle_is_refused(device, tmp_path: Path, case, member, message):
    minor = CASES.index(next(c for c in CASES if c[0] == case))
    version = f"3.{minor}.0"
    good, _ = make_bundle(tmp_path, name="clf", version=version, release=10 + minor, scale=3.0)
    crafted = tmp_path / "crafted.tar"
    with tarfile.open(good) as src, tarfile.open(crafted, "w", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m))
        info, data = member
        out.addfile(info, io.BytesIO(data) if data else None)
    path = f"clf/{version}/default/bundle.tar"
    custom = {"model": "clf", "version": version, "release": 10 + minor, "variant": "default"}
    device.repo.add_target(path, crafted, custom)
    d = device.desired(version)
    out = device.outcome(d["seq"], device.send(device.sign(d)))
    assert out["phase"] == "failed"
    assert out["reason"] == f"bad_bundle: {message}"
    assert out["desired_seq"] == d["seq"]
    # nothing escaped the slot directory, and no half-extracted slot is left behind
    assert not Path("/tmp/fleet-evil").exists()
    assert not list(device.data_dir.parent.rglob("evil"))
    assert not (device.data_dir / "models" / "clf" / f"{version}-default").exists()
