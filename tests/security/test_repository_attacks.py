"""Attacks through the image repository and the download path, against a real daemon serving
clf 2.0.0: the attacker controls the HTTP mirror (a network attacker, a compromised CDN or
server) and, where said, holds the server's ONLINE keys (director, snapshot, timestamp), never the
targets or root key.

Each desired state here is genuine (signed by the real director key) and names clf 3.0.0, which
is published and valid, so the protection under test is the only thing stopping the install.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

from device_client.trust import RepositoryUnavailable
from tests.helpers.testbed import Testbed

pytestmark = pytest.mark.mqtt

#: short deadlines so that the slow-drip attacks end quickly; 2 s is ample for 10 kB on loopback
TESTBED_SETTINGS = {"download_deadline_s": 2.0, "metadata_deadline_s": 2.0, "download_attempts": 2}
TARGET = "clf/3.0.0/default/bundle.tar"


@pytest.fixture(scope="module", autouse=True)
def published(tb):
    tb.publish("3.0.0", 3, scale=3.0)


def _attempt(device: Testbed) -> tuple[dict, dict]:
    """Ask the device to install 3.0.0 with a genuine desired state; return (desired, outcome)."""
    d = device.desired("3.0.0")
    mark = device.send(device.sign(d))
    out = device.outcome(d["seq"], mark)
    assert out["phase"] == "failed", out
    return d, out


def _url(device: Testbed, path: str) -> str:
    return device.mirror.url + path


def _bytes(md: Metadata) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


def _sign(device: Testbed, md: Metadata, signer: CryptoSigner | None = None) -> bytes:
    """Sign ``md`` with the repository's own key of its role (the online keys) or ``signer``."""
    root = device.repo._root().signed
    md.sign(signer or device.repo._signer(md.signed.type, root))
    return _bytes(md)


def _refresh(device: Testbed) -> None:
    """Let the device's TUF client see the repository's current (newest) metadata."""
    assert device.daemon.tuf.lookup(TARGET) is not None


# --------------------------------------------------------------------------- bundle downloads


def test_tampered_bundle_of_the_same_length(device):
    # protection: the download is hashed while streaming and must equal the TUF-listed sha256
    path = device.target_url_path("3.0.0")
    good = (device.repo.repo_dir / path.lstrip("/")).read_bytes()
    evil = bytearray(good)
    evil[len(evil) // 2] ^= 0xFF
    device.mirror.lie(path, body=bytes(evil))
    d, out = _attempt(device)
    sha = d["hashes"]["sha256"]
    assert out["reason"] == (
        f"download_failed: {_url(device, path)}: sha256 {hashlib.sha256(evil).hexdigest()} "
        f"differs from the expected {sha}"
    )
    assert out["desired_seq"] == d["seq"]
    assert not list((device.data_dir / "downloads").glob("*.partial"))  # poisoned bytes are deleted


def test_truncated_download(device):
    # protection: the announced length must equal the listed one (no short file is accepted)
    path = device.target_url_path("3.0.0")
    good = (device.repo.repo_dir / path.lstrip("/")).read_bytes()
    device.mirror.lie(path, body=good[:1000])
    _, out = _attempt(device)
    assert out["reason"] == (
        f"download_failed: {_url(device, path)}: server has 1000 bytes, expected {len(good)}"
    )


def test_download_cut_short_while_announcing_the_full_length(device):
    # protection: a body ending early is an interruption; after the retries it fails, never installs
    path = device.target_url_path("3.0.0")
    good = (device.repo.repo_dir / path.lstrip("/")).read_bytes()
    device.mirror.lie(path, body=good[:1000], length=len(good))
    _, out = _attempt(device)
    assert out["reason"].startswith(f"download_failed: {_url(device, path)}: connection broke: ")


def test_oversized_download(device):
    # protection: more bytes than listed are refused, announced or not
    path = device.target_url_path("3.0.0")
    good = (device.repo.repo_dir / path.lstrip("/")).read_bytes()
    device.mirror.lie(path, body=good + b"\0" * 4096)
    _, out = _attempt(device)
    assert out["reason"] == (
        f"download_failed: {_url(device, path)}: server has {len(good) + 4096} bytes, expected {len(good)}"
    )
    device.mirror.lie(path, body=good + b"\0" * 4096, length=-1)  # no Content-Length: counted
    _, out = _attempt(device)
    assert out["reason"] == (
        f"download_failed: {_url(device, path)}: more than the expected {len(good)} bytes"
    )


def test_slow_drip_download(device):
    # protection: a hard total deadline (download_deadline_s = 2 s here), however steady the drip
    path = device.target_url_path("3.0.0")
    device.mirror.lie(path, drip=(200, 0.1))  # 10 kB at 2 kB/s: 5 s, each read well inside 5 s
    _, out = _attempt(device)
    assert out["reason"] == f"download_failed: download of {_url(device, path)} exceeded its 2 s deadline"


# --------------------------------------------------------------------------- TUF metadata


def test_targets_metadata_signed_by_a_foreign_key(device, tmp_path):
    # protection: targets metadata must carry the targets key's signature from the pinned root.
    # The attacker holds the online snapshot and timestamp keys and the director key, lists an
    # evil bundle in targets v+1 signed by its own key, and signs snapshot/timestamp properly.
    from tests.helpers.bundles import make_bundle

    repo = device.repo
    ts, snap = repo._timestamp(), repo._snapshot()
    targets = repo._targets(snap.signed)
    evil_tar, _ = make_bundle(tmp_path, name="clf", version="6.6.6", release=66)
    with open(evil_tar, "rb") as fh:
        info = TargetFile.from_data("clf/6.6.6/default/bundle.tar", fh, ["sha256"])
    info.unrecognized_fields["custom"] = {
        "model": "clf",
        "version": "6.6.6",
        "release": 66,
        "variant": "default",
    }
    targets.signed.targets[info.path] = info
    targets.signed.version += 1
    foreign = Ed25519PrivateKey.generate()
    evil_targets = _sign(device, targets, CryptoSigner(foreign, SSlibKey.from_crypto(foreign.public_key())))
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
    device.mirror.lie(f"metadata/{targets.signed.version}.targets.json", body=evil_targets)
    device.mirror.lie(f"metadata/{snap.signed.version}.snapshot.json", body=_sign(device, snap))
    device.mirror.lie("metadata/timestamp.json", body=_sign(device, ts))
    sha = info.hashes["sha256"]
    device.mirror.lie(f"targets/clf/6.6.6/default/{sha}.bundle.tar", body=evil_tar.read_bytes())
    try:
        d = device.desired("6.6.6", release=66, target=info.path, length=info.length, hashes={"sha256": sha})
        report = device.rejection(device.send(device.sign(d)))
        assert report["reason"] == (
            "repository_error: TUF refresh failed: UnsignedMetadataError: targets was signed by 0/1 keys"
        )
        assert report["desired_seq"] == d["seq"]
        assert not [p for p in device.mirror.requests if "6.6.6" in p]
    finally:
        # the device now trusts the attacker's (validly signed) timestamp and snapshot versions;
        # the real repository publishes past them so the next tests start clean
        device.mirror.truth()
        device.heal()


def test_expired_timestamp(device):
    # protection: ngclient refuses expired metadata (a freeze attack: the attacker keeps serving
    # an old, validly signed timestamp so that the device never hears of a revocation)
    _refresh(device)
    ts = device.repo._timestamp()
    ts.signed.version += 1
    ts.signed.expires = (device.repo._clock() - timedelta(hours=1)).replace(microsecond=0)
    device.mirror.lie("metadata/timestamp.json", body=_sign(device, ts))
    d, out = _attempt(device)
    assert (
        out["reason"]
        == "repository_error: TUF refresh failed: ExpiredMetadataError: timestamp.json is expired"
    )
    assert out["desired_seq"] == d["seq"]


def test_replayed_older_timestamp(device):
    # protection: rollback attack on timestamp: the device saw a newer version, an older one is refused
    old = (device.repo.metadata_dir / "timestamp.json").read_bytes()
    old_version = device.repo._timestamp().signed.version
    device.heal(1)
    _refresh(device)  # the device has now seen old_version + 1
    device.mirror.lie("metadata/timestamp.json", body=old)
    _, out = _attempt(device)
    assert out["reason"] == (
        "repository_error: TUF refresh failed: BadVersionNumberError: "
        f"New timestamp version {old_version} must be >= {old_version + 1}"
    )


def test_replayed_older_snapshot(device):
    # protection: rollback attack on snapshot, served as the file the new timestamp names
    _refresh(device)
    old_version = device.repo._snapshot().signed.version
    old = (device.repo.metadata_dir / f"{old_version}.snapshot.json").read_bytes()
    device.heal(1)
    device.mirror.lie(f"metadata/{old_version + 1}.snapshot.json", body=old)
    _, out = _attempt(device)
    assert out["reason"] == (
        "repository_error: TUF refresh failed: BadVersionNumberError: "
        f"Expected snapshot version {old_version + 1}, got {old_version}"
    )


def test_timestamp_pointing_at_an_older_snapshot(device):
    # protection: rollback attack by someone holding the online timestamp key: a fresh, validly
    # signed timestamp that names an older snapshot version is refused
    _refresh(device)
    ts = device.repo._timestamp()
    current = ts.signed.snapshot_meta.version
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=current - 1)
    device.mirror.lie("metadata/timestamp.json", body=_sign(device, ts))
    _, out = _attempt(device)
    assert out["reason"] == (
        "repository_error: TUF refresh failed: BadVersionNumberError: "
        f"New snapshot version must be >= {current}, got version {current - 1}"
    )


def test_oversized_metadata_beyond_ngclient_max_length(device):
    # protection: ngclient's timestamp_max_length (16 KiB): the body is cut off at the limit
    ts = (device.repo.metadata_dir / "timestamp.json").read_bytes()
    padded = ts.rstrip()[:-1] + b" " * 20_000 + b"}"  # still valid JSON, still validly signed
    device.mirror.lie("metadata/timestamp.json", body=padded, length=-1)
    d, out = _attempt(device)
    assert re.fullmatch(
        r"repository_error: metadata download failed: Downloaded \d+ bytes exceeding the maximum"
        r" allowed length of 16384",
        out["reason"],
    ), out["reason"]
    assert out["desired_seq"] == d["seq"]


def test_oversized_metadata_announced_beyond_the_fetcher_cap(device):
    # protection: HttpxFetcher refuses an announced length above max_metadata_bytes before reading
    device.mirror.lie("metadata/timestamp.json", body=b"{}", length=10**10)
    _, out = _attempt(device)
    assert out["reason"] == (
        f"repository_error: metadata download failed: {_url(device, '/metadata/timestamp.json')}: "
        f"announces {10**10} bytes, cap is {16 * 1024 * 1024}"
    )


def test_slow_drip_metadata_is_bounded(device):
    # protection: the metadata fetch has a total deadline (2 s here): a drip cannot hold the
    # device's worker; it is treated as an outage (retried later, no deployment failure)
    ts = (device.repo.metadata_dir / "timestamp.json").read_bytes()
    device.mirror.lie("metadata/timestamp.json", body=ts, drip=(20, 0.1))
    started = time.monotonic()
    with pytest.raises(RepositoryUnavailable) as exc:
        device.daemon.tuf.lookup(TARGET)
    assert time.monotonic() - started < 2.0 + 2.0 + 1.0
    assert exc.value.reason.startswith("repository_unavailable: repository unreachable: download of ")
    assert exc.value.reason.endswith("exceeded its 2 s deadline")
