"""Every name check matches the whole value: a final newline, a carriage return, a NUL or a Unicode
look-alike (Cyrillic letters, fullwidth or Arabic-Indic digits) never passes, in Python (where
``re.match`` with ``$`` accepts a final ``\\n``) nor in pydantic ``pattern=`` constraints.
"""

from __future__ import annotations

import base64
import tarfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import ValidationError

from device_client.protocol import InvalidTopic, parse_topic
from device_client.protocol.bundle import BundleManifest, MemberInfo, _check_member, build_bundle
from device_client.protocol.errors import BundleError
from device_client.protocol.messages import DesiredState, HealthWindow, Presence, Report, utcnow
from device_client.protocol.topics import is_valid_device_id
from server.catalog.schemas import check_model_name, check_variant, check_version
from server.devices.service import decode_cursor, encode_cursor
from server.devices.tags import check_tag, parse_tag_expr
from server.errors import Invalid
from server.http.routers.tuf import METADATA_NAME_RE
from server.trust.pki import parse_csr
from server.trust.repository import InvalidTargetPath, check_target_path
from tests.helpers.device_fleet import auth
from tests.helpers.onnx_models import make_model
from tests.helpers.pki import HARDWARE, make_csr

CYRILLIC = str.maketrans({"a": "\u0430", "e": "\u0435", "o": "\u043e", "c": "\u0441"})
FULLWIDTH = str.maketrans({str(d): chr(0xFF10 + d) for d in range(10)})
ARABIC_INDIC = str.maketrans({str(d): chr(0x0660 + d) for d in range(10)})


def spoofs(value: str) -> list[str]:
    """``value`` with a control character around it, or one character swapped for a look-alike."""
    out = [
        value + "\n",
        value + "\r",
        value + "\r\n",
        value + "\x00",
        "\n" + value,
        value[:1] + "\x00" + value[1:],
    ]
    for table in (CYRILLIC, FULLWIDTH, ARABIC_INDIC):
        if value.translate(table) != value:
            out.append(value.translate(table))
            # only the last one ("1.0.0-1rc" -> "1.0.0-\uff11rc": \d matched it in either regex engine)
            i = max(i for i, ch in enumerate(value) if ch.translate(table) != ch)
            out.append(value[:i] + value[i].translate(table) + value[i + 1 :])
    return out


def _accepts(check: Callable[[str], Any], errors: tuple[type[BaseException], ...]) -> Callable[[str], bool]:
    """``check`` as a predicate: True when it neither raises one of ``errors`` nor returns False."""

    def accepts(value: str) -> bool:
        try:
            return check(value) is not False
        except errors:
            return False

    return accepts


def _payload(model: type, field: str, base: dict[str, Any]) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        model.model_validate({**base, field: value})
        return True

    return _accepts(check, (ValidationError,))


NOW = utcnow()
DESIRED = {
    "schema": DesiredState.SCHEMA, "device_id": "cam-1", "seq": 3, "issued_at": NOW,
    "expires_at": NOW + timedelta(hours=1), "model": "det", "version": "1.2.0", "release": 4,
    "target": "det/1.2.0/default/bundle.tar", "length": 100, "hashes": {"sha256": "ab" * 32},
}  # fmt: skip
REPORT = {"schema": Report.SCHEMA, "device_id": "cam-1", "seq": 1, "at": NOW, "phase": "succeeded"}
HEALTH = {
    "schema": HealthWindow.SCHEMA, "device_id": "cam-1", "seq": 1, "at": NOW, "window_s": 10,
    "model": "det", "version": "1.2.0", "requests": 1, "errors": 0,
}  # fmt: skip
PRESENCE = {"schema": Presence.SCHEMA, "device_id": "cam-1", "status": "online"}
MANIFEST = {
    "schema": BundleManifest.SCHEMA, "name": "det", "version": "1.2.0", "release": 1, "variant": "cpu",
    "inputs": [], "outputs": [], "members": {"model.onnx": {"length": 1, "sha256": "ab" * 32}},
}  # fmt: skip


def _csr_cn(value: str) -> bool:
    return parse_csr(make_csr(value)[0])[1] == value


def _member_key(value: str) -> bool:
    BundleManifest.model_validate({**MANIFEST, "members": {value: {"length": 1, "sha256": "ab" * 32}}})
    return True


def _tar_member(value: str) -> bool:
    info = tarfile.TarInfo(value)
    info.size = 1
    _check_member(info)
    return True


def _manifest_member(tmp: Path) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        src = tmp / "m.bin"
        src.write_bytes(b"x")
        fields = {k: v for k, v in MANIFEST.items() if k not in ("schema", "members")}
        build_bundle(tmp / "b.tar", fields, {value: src})
        return True

    return check


def _topic(value: str) -> bool:
    return parse_topic(f"fleet/v1/d/{value}/report")[0] == value


def _cursor(value: str) -> bool:
    return decode_cursor(encode_cursor(value)) == value


# (what, a valid value, check returning True/raising) -- each valid value passes, every spoof fails
VALIDATORS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("device id", "dev-victim", is_valid_device_id),
    ("device id in a topic", "dev-victim", _accepts(_topic, (InvalidTopic,))),
    ("device id as a CSR CN", "dev-victim", _accepts(_csr_cn, (Invalid,))),
    ("device id cursor", "dev-victim", _accepts(_cursor, (Invalid,))),
    ("model name", "clf", _accepts(check_model_name, (Invalid,))),
    ("version", "1.0.0-rc.1", _accepts(check_version, (Invalid,))),
    ("version prerelease", "1.0.0-1rc", _accepts(check_version, (Invalid,))),
    ("variant", "int8", _accepts(check_variant, (Invalid,))),
    ("tag key", "site", _accepts(lambda v: check_tag(v, "berlin"), (Invalid,))),
    ("tag value", "berlin-10", _accepts(lambda v: check_tag("site", v), (Invalid,))),
    ("tag expression", "site:berlin-10", _accepts(parse_tag_expr, (Invalid,))),
    ("target path", "clf/1.0.0/default/bundle.tar", _accepts(check_target_path, (InvalidTargetPath,))),
    ("target path segment", "clf/1.0.0/default", _accepts(check_target_path, (InvalidTargetPath,))),
    ("metadata file", "1.root.json", lambda v: METADATA_NAME_RE.fullmatch(v) is not None),
    ("bundle member in a tar", "model.onnx", _accepts(_tar_member, (BundleError,))),
    ("bundle member in bundle.json", "model.onnx", _accepts(_member_key, (ValidationError,))),
    ("DesiredState.device_id", "cam-1", _payload(DesiredState, "device_id", DESIRED)),
    ("DesiredState.model", "det", _payload(DesiredState, "model", DESIRED)),
    ("DesiredState.version", "1.0.0-1rc", _payload(DesiredState, "version", DESIRED)),
    ("DesiredState.variant", "cpu", _payload(DesiredState, "variant", DESIRED)),
    ("Report.device_id", "cam-1", _payload(Report, "device_id", REPORT)),
    ("HealthWindow.device_id", "cam-1", _payload(HealthWindow, "device_id", HEALTH)),
    ("Presence.device_id", "cam-1", _payload(Presence, "device_id", PRESENCE)),
    ("bundle.json name", "det", _payload(BundleManifest, "name", MANIFEST)),
    ("bundle.json version", "1.0.0-1rc", _payload(BundleManifest, "version", MANIFEST)),
    ("bundle.json variant", "cpu", _payload(BundleManifest, "variant", MANIFEST)),
    ("member sha256", "ab" * 32, _payload(MemberInfo, "sha256", {"length": 1})),
]


@pytest.mark.parametrize(("what", "valid", "check"), VALIDATORS, ids=[v[0] for v in VALIDATORS])
def test_every_name_check_matches_the_whole_value(what, valid, check):
    # protection: fullmatch with ASCII-only classes (re.ASCII, [0-9] for \d) in every Python check;
    # pydantic-core's Rust regex, where $ is the end of the text, for pattern= constraints
    assert check(valid), f"{what}: the valid {valid!r} is refused"
    accepted = [s for s in spoofs(valid) if check(s)]
    assert accepted == [], f"{what}: accepted {accepted!r}"


def test_bundle_member_names_are_checked_when_building(tmp_path):
    check = _accepts(_manifest_member(tmp_path), (BundleError,))
    assert check("model.onnx")
    assert [s for s in spoofs("model.onnx") if check(s)] == []


# ----------------------------------------------------------------------------- the real server


@pytest.mark.mqtt
def test_the_server_refuses_names_with_a_final_newline(live_server, tmp_path):
    live = live_server
    r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={"uses": 5}, headers=auth(live))
    token = r.json()["token"]

    # the CA would have certified CN "dev-victim\n" (a second identity beside "dev-victim")
    csr, _ = make_csr("dev-victim\n")
    r = httpx.post(f"{live.url}/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 422, r.text
    assert "CSR CN 'dev-victim\\n' is not a valid device id" in r.json()["detail"]
    csr, _ = make_csr("dev-vict\u0456m")  # Cyrillic i
    r = httpx.post(f"{live.url}/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 422, r.text

    onnx = make_model(tmp_path / "m.onnx").read_bytes()

    def push(name: str, version: str = "1.0.0", variant: str = "default") -> httpx.Response:
        return httpx.post(
            f"{live.url}/api/v1/models/{quote(name, safe='')}/versions",
            data={"version": version, "variant": variant},
            files={"file": ("model.onnx", onnx, "application/octet-stream")},
            headers=auth(live),
            timeout=60,
        )

    r = push("clf\n")
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("invalid model name 'clf\\n'")
    # the form's text fields are trimmed of surrounding whitespace ("1.0.0\n" is stored as "1.0.0");
    # what is left must match whole
    r = push("clf", version="1.0.0\x00")
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("invalid version '1.0.0\\x00'")
    r = push("clf", version="1.0.0-\uff11rc")  # a fullwidth digit in the pre-release
    assert r.status_code == 422, r.text
    r = push("clf", variant="int8\x00")
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("invalid variant 'int8\\x00'")
    r = httpx.get(f"{live.url}/api/v1/models", headers=auth(live, "viewer"))
    assert r.json() == []  # nothing of the refused pushes was stored

    for tags in ({"site": "berlin\n"}, {"site\n": "berlin"}, {"site": "b\u0435rlin"}):
        r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={"tags": tags}, headers=auth(live))
        assert r.status_code == 422, r.text
    r = httpx.get(f"{live.url}/api/v1/devices", params={"tag": "site:berlin\n"}, headers=auth(live, "viewer"))
    assert r.status_code == 422, r.text
    cursor = base64.urlsafe_b64encode(b"dev-victim\n").decode().rstrip("=")
    r = httpx.get(f"{live.url}/api/v1/devices", params={"cursor": cursor}, headers=auth(live, "viewer"))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "malformed cursor"
