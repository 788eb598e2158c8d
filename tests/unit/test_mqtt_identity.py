"""The server's MQTT identities (server/mqtt/identity.py) and the ACL that admits them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from pydantic import ValidationError

from device_client.protocol.topics import is_valid_device_id
from server.config import Settings
from server.mqtt.broker import UnlistedServerIdentity, acl_text, acl_users, check_acl_lists
from server.mqtt.identity import (
    ClientIdentity,
    connection_ids,
    consumer_id,
    default_server_name,
    ingest_id,
    is_server_identity,
)
from server.trust.pki import FleetCA


def test_each_connection_of_each_server_has_an_identity_no_device_can_take() -> None:
    assert connection_ids("web1", 0) == ["fleet_server.web1", "fleet_server.web1.pub"]
    assert connection_ids("web1", 1) == connection_ids("web1", 0)  # a lone child keeps the session
    assert ingest_id("web1", 0, 1) == consumer_id("web1")
    many = connection_ids("web1", 3)
    assert many[2:] == [f"fleet_server.web1.ingest-{i}" for i in range(3)]
    every = many + connection_ids("web2", 3) + connection_ids("x" * 40, 64)
    assert len(set(every)) == len(every)
    for cn in every:
        assert is_server_identity(cn)
        assert not is_valid_device_id(cn)
        assert len(cn) <= 64  # what a certificate CN may hold


@pytest.mark.parametrize(
    ("hostname", "port", "name"),
    [
        ("web1", 8080, "web1-8080"),
        ("ip-10-0-0-1.ec2.internal", 8080, "ip-10-0-0-1-ec2-internal-8080"),
        ("_weird_", 80, "weird--80"),
    ],
)
def test_the_default_server_name_is_host_and_port(hostname: str, port: int, name: str) -> None:
    assert default_server_name(hostname, port) == name


def test_a_long_host_name_is_shortened_and_stays_distinct() -> None:
    a, b = default_server_name("a" * 60 + "1", 8080), default_server_name("a" * 60 + "2", 8080)
    assert a != b
    assert len(a) == len(b) == 40
    assert Settings(mqtt_server_name=a).mqtt_server_name == a


@pytest.mark.parametrize("name", ["a.b", "-a", "a b", "a\nuser x", "x" * 41, "fleet_server"])
def test_a_server_name_outside_letters_digits_and_dashes_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="mqtt_server_name"):
        Settings(mqtt_server_name=name)


@pytest.mark.parametrize(
    "cn", ["dev-a", "fleet_server.a\nuser dev-b", "fleet_server.a\n", "fleet_server.a.b", "fleet_serverx"]
)
def test_the_acl_admits_only_server_identities(cn: str) -> None:
    # a device id, a name smuggling an ACL line, or anything else is refused, never written
    with pytest.raises(ValueError, match="not server MQTT identities"):
        acl_text(["fleet_server.web1", cn])


def test_the_acl_gives_each_server_identity_the_fleet_topics(tmp_path: Path) -> None:
    text = acl_text(connection_ids("web1", 0))
    assert "user fleet_server.web1\ntopic readwrite fleet/v1/d/#\n" in text
    assert "user fleet_server.web1.pub\ntopic readwrite fleet/v1/d/#\n" in text
    (tmp_path / "acl").write_text(text)
    assert acl_users(tmp_path / "acl") == {"fleet_server", "fleet_server.web1", "fleet_server.web1.pub"}
    check_acl_lists(tmp_path, connection_ids("web1", 0))
    check_acl_lists(tmp_path / "elsewhere", connection_ids("web2", 0))  # no ACL there: nothing to check
    unlisted = r"identities fleet_server\.web2, fleet_server\.web2\.pub:"
    with pytest.raises(UnlistedServerIdentity, match=unlisted):
        check_acl_lists(tmp_path, connection_ids("web2", 0))


def test_an_issued_identity_has_its_cn_and_the_client_eku(tmp_path: Path) -> None:
    ca = FleetCA(tmp_path / "ca")
    identity = ClientIdentity.issue(ca, "fleet_server.web1")
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "fleet_server.web1"
    assert cert.issuer == ca.cert.subject
    assert "key_pem" not in repr(identity)
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    identity.ssl_context(tmp_path / "ca.crt")  # loads the pair
