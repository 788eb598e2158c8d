"""MQTT failure reasons, the warning rate limit and the link state (device_client/linkstate.py)."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading

import pytest

from device_client.linkstate import (
    Endpoint,
    LinkFailure,
    LinkState,
    WarnLimiter,
    describe_connack,
    describe_disconnect,
    describe_error,
    describe_socket_error,
)

EP = Endpoint("broker.example", 8883, ca_file="/d/ca.crt", cert_file="/d/device.crt")


def _verify_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    exc.verify_message = "unable to get local issuer certificate"
    return exc


def _alert(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


@pytest.mark.parametrize(
    ("exc", "reason", "says"),
    [
        (_verify_error(), "tls_verify", "against CA file /d/ca.crt: unable to get local issuer"),
        (_alert("TLSV1_ALERT_UNKNOWN_CA"), "tls_rejected", "certificate /d/device.crt (unknown ca)"),
        (_alert("SSLV3_ALERT_CERTIFICATE_REVOKED"), "tls_rejected", "(certificate revoked)"),
        (_alert("WRONG_VERSION_NUMBER"), "tls", "TLS handshake with broker.example:8883 failed"),
        (ssl.SSLEOFError(8, "EOF occurred"), "tls", "closed the handshake without an alert"),
        (ConnectionRefusedError(111, "Connection refused"), "refused", "to broker.example:8883 refused"),
        (socket.gaierror(-2, "Name or service not known"), "dns", "cannot resolve broker.example"),
        (TimeoutError("timed out"), "timeout", "no answer from broker.example:8883"),
        (OSError(113, "No route to host"), "network", "No route to host"),
    ],
)  # fmt: skip
def test_connect_errors_name_their_reason(exc, reason, says):
    failure = describe_error(exc, EP)
    assert failure.reason == reason
    assert says in failure.message


def test_a_real_handshake_against_a_foreign_ca_is_a_verify_failure(tmp_path):
    """Not a hand-made exception: the one Python raises for a server certificate from another CA."""
    from server.mqtt.broker import write_broker_config
    from server.trust.pki import FleetCA

    theirs = write_broker_config(FleetCA(tmp_path / "theirs"), tmp_path / "b", port=1)
    mine = FleetCA(tmp_path / "mine")
    (tmp_path / "mine.crt").write_text(mine.cert_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(theirs.outdir / "broker.crt", theirs.outdir / "broker.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "mine.crt"))

    def serve(sock: ssl.SSLSocket) -> None:
        with contextlib.suppress(OSError):  # the client's alert
            sock.do_handshake()

    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        srv = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        cli = client_ctx.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
        other_end = threading.Thread(target=serve, args=(srv,), daemon=True)
        other_end.start()
        with pytest.raises(ssl.SSLError) as caught:
            cli.do_handshake()
        other_end.join(5)
    failure = describe_error(caught.value, Endpoint("localhost", 1, ca_file=str(tmp_path / "mine.crt")))
    assert failure.reason == "tls_verify"
    assert "unable to get local issuer certificate" in failure.message


def test_dropped_connections_and_connack_refusals():
    text = "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert (_ssl.c:2580)"
    assert describe_socket_error(text, EP).reason == "tls_rejected"
    assert describe_socket_error("timeout on socket: timed out", EP).reason == "timeout"
    assert describe_socket_error("failed to receive on socket: reset", EP) == LinkFailure(
        "lost", "connection to broker.example:8883 lost: failed to receive on socket: reset"
    )
    assert describe_connack("Not authorized", EP).reason == "not_authorized"
    assert describe_connack("Bad user name or password", EP).reason == "not_authorized"
    assert describe_connack("Server unavailable", EP).reason == "connack"
    assert describe_disconnect("Keep alive timeout", False, None, EP).reason == "timeout"
    assert describe_disconnect("Session taken over", True, None, EP).message == (
        "the broker at broker.example:8883 closed the connection: Session taken over"
    )
    assert describe_disconnect("Unspecified error", False, None, EP).reason == "lost"


def test_the_limiter_lets_one_warning_per_reason_through_each_interval():
    now = [0.0]
    limiter = WarnLimiter(60.0, clock=lambda: now[0])
    assert limiter.check("refused") == (True, 0)
    assert limiter.check("refused") == (False, 0)
    assert limiter.check("tls_verify") == (True, 0)  # another reason is not held back
    now[0] = 30.0
    assert limiter.check("refused") == (False, 0)
    now[0] = 61.0
    assert limiter.check("refused") == (True, 2)  # and it says how many were held back


def test_link_state_counts_every_failure_and_warns_once_per_interval(caplog):
    now = [0.0]
    seen: list[dict] = []
    state = LinkState("link", EP, limiter=WarnLimiter(60.0, clock=lambda: now[0]), on_change=seen.append)
    refused = LinkFailure("refused", "connection to broker.example:8883 refused")
    with caplog.at_level(logging.INFO, logger="device_client.linkstate"):
        for _ in range(5):
            state.attempt()
            state.failed(refused)
        now[0] = 120.0
        state.attempt()
        state.failed(refused)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "MQTT link: connection to broker.example:8883 refused [refused]; retrying",
        "MQTT link: connection to broker.example:8883 refused [refused]; retrying"
        " (4 more since the last warning)",
    ]
    snap = state.snapshot()
    assert snap["state"] == "disconnected"
    assert snap["connected"] is False
    assert snap["failures"] == {"refused": 6}
    assert snap["last_error"]["reason"] == "refused"
    assert len(seen) == 1  # recorded on a change of state or error, not on every retry

    state.attempt()
    state.failed(LinkFailure("not_authorized", "refused: Not authorized"))
    state.closed(LinkFailure("lost", "connection lost"))  # the disconnect after the refused CONNACK
    assert state.snapshot()["failures"] == {"refused": 6, "not_authorized": 1}

    with caplog.at_level(logging.INFO, logger="device_client.linkstate"):
        state.connected()
    assert "connected to broker.example:8883 after 7 failed attempt(s) (last: not_authorized)" in caplog.text
    assert state.snapshot()["state"] == "connected"
    state.closed(LinkFailure("lost", "connection lost"))  # a drop of an established connection counts
    assert state.snapshot()["failures"]["lost"] == 1
