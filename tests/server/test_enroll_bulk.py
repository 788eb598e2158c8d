"""Bulk enrollment (``POST /api/v1/enroll/bulk``): many CSRs in one call, all or none, for an
operator holding an enrollment token with enough uses; each device as a single enrollment makes it."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import event

from device_client.protocol.enrollment import EnrollRequest
from server.admin.tables import AuditEntry
from server.devices.service import DeviceService
from server.devices.tables import Device, EnrollmentToken
from server.errors import Forbidden
from tests.helpers.pki import HARDWARE, make_csr


def _token(client, headers, uses: int, tags=None) -> str:
    r = client.post("/api/v1/enroll-tokens", json={"uses": uses, "tags": tags or {}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _body(token: str, ids: list[str]) -> dict:
    return {"token": token, "devices": [{"csr_pem": make_csr(d)[0], "hardware": HARDWARE} for d in ids]}


def _count(ctx, model) -> int:
    with ctx.db.session_scope() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(model))


def test_bulk_enrollment_registers_every_device_with_its_own_identity(app_client, ctx, make_token):
    headers = {"Authorization": f"Bearer {make_token('operator')}"}
    token = _token(app_client, headers, 3, {"site": "line-4"})
    r = app_client.post("/api/v1/enroll/bulk", json=_body(token, ["b-1", "b-2", "b-3"]), headers=headers)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert [d["device_id"] for d in doc["devices"]] == ["b-1", "b-2", "b-3"]
    assert doc["tags"] == {"site": "line-4"}
    assert doc["ca_certificate_pem"] == ctx.ca.cert_pem
    assert "signed" in doc["tuf_root"]
    for item in doc["devices"]:
        cert = x509.load_pem_x509_certificate(item["certificate_pem"].encode())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == item["device_id"]
        assert item["device_token"].startswith(f"fd.{item['device_id']}.")
    assert len({d["device_token"] for d in doc["devices"]}) == 3
    # each device token works like a single enrollment's
    me = app_client.get(
        "/tuf/targets/none/x.tar", headers={"Authorization": f"Bearer {doc['devices'][0]['device_token']}"}
    )
    assert me.status_code == 404  # authorised, just no such target
    got = app_client.get("/api/v1/devices/b-2", headers=headers).json()
    assert got["tags"] == {"site": "line-4"}
    assert got["status"] == "enrolled"
    with ctx.db.session_scope() as s:
        assert s.scalar(sa.select(EnrollmentToken.uses_left)) == 0
        audits = s.scalars(sa.select(AuditEntry.target_id).where(AuditEntry.action == "device.enroll")).all()
    assert sorted(audits) == ["b-1", "b-2", "b-3"]


def test_bulk_enrollment_is_all_or_nothing_and_needs_an_operator(app_client, ctx, make_token):
    operator = {"Authorization": f"Bearer {make_token('operator')}"}
    viewer = {"Authorization": f"Bearer {make_token('viewer')}"}
    token = _token(app_client, operator, 2)
    assert app_client.post("/api/v1/enroll/bulk", json=_body(token, ["c-1"])).status_code == 401
    assert (
        app_client.post("/api/v1/enroll/bulk", json=_body(token, ["c-1"]), headers=viewer).status_code == 403
    )
    # more CSRs than the token has uses: refused, nothing enrolled, no use consumed
    r = app_client.post("/api/v1/enroll/bulk", json=_body(token, ["c-1", "c-2", "c-3"]), headers=operator)
    assert r.status_code == 403, r.text
    # the same id twice
    r = app_client.post("/api/v1/enroll/bulk", json=_body(token, ["c-1", "c-1"]), headers=operator)
    assert r.status_code == 422, r.text
    assert _count(ctx, Device) == 0
    # one id already taken: the whole batch is refused
    single = app_client.post(
        "/api/v1/enroll", json={"token": token, "csr_pem": make_csr("c-2")[0], "hardware": HARDWARE}
    )
    assert single.status_code == 201, single.text
    r = app_client.post("/api/v1/enroll/bulk", json=_body(token, ["c-1", "c-2"]), headers=operator)
    assert r.status_code in (403, 409), r.text
    r = app_client.post("/api/v1/enroll/bulk", json=_body(_token(app_client, operator, 5), ["c-3", "c-2"]),
                        headers=operator)  # fmt: skip
    assert r.status_code == 409, r.text
    assert _count(ctx, Device) == 1
    with ctx.db.session_scope() as s:
        assert sorted(s.scalars(sa.select(EnrollmentToken.uses_left))) == [1, 5]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("uses", [1, 2])
def test_concurrent_enrollments_never_share_a_token_use(app_client, ctx, make_token, uses):
    """Two enrollments read the token while both its uses (or its last one) look free; the second
    takes its use only after the first committed. On SQLite, where ``FOR UPDATE`` does nothing, a
    read-then-write token decrement lost the first one's use: a 1-use token enrolled two devices.
    (On PostgreSQL the row lock serializes the reads themselves, so this interleaving cannot occur.)"""
    token = _token(app_client, {"Authorization": f"Bearer {make_token('operator')}"}, uses)
    first_in, second_read = threading.Event(), threading.Event()

    def signal_token_read(_conn, _cursor, statement, *_args) -> None:
        if threading.current_thread() is second_thread and "FROM enrollment_tokens" in statement:
            second_read.set()

    def enroll(device_id: str, *, before_commit=None) -> None:
        req = EnrollRequest(token=token, csr_pem=make_csr(device_id)[0], hardware=HARDWARE)
        with ctx.db.session_scope() as s:
            DeviceService(s, ctx).enroll(req)
            if before_commit is not None:
                before_commit()

    outcome: dict[str, object] = {}

    def run(name: str, fn) -> None:
        try:
            fn()
            outcome[name] = "enrolled"
        except Exception as exc:  # recorded and asserted below
            outcome[name] = exc

    def first() -> None:
        # enrolled, then held open until the second enrollment has read the token
        enroll("race-1", before_commit=lambda: (first_in.set(), second_read.wait(10)))

    def later() -> None:
        first_in.wait(10)
        enroll("race-2")

    event.listen(ctx.db.engine, "after_cursor_execute", signal_token_read)
    try:
        first_thread = threading.Thread(target=run, args=("race-1", first))
        second_thread = threading.Thread(target=run, args=("race-2", later))
        first_thread.start()
        second_thread.start()
        first_thread.join(30)
        second_thread.join(30)
    finally:
        event.remove(ctx.db.engine, "after_cursor_execute", signal_token_read)
    assert second_read.is_set()
    assert outcome["race-1"] == "enrolled"
    with ctx.db.session_scope() as s:
        enrolled = sorted(s.scalars(sa.select(Device.id)))
        left = s.scalar(sa.select(EnrollmentToken.uses_left))
    if uses == 2:
        assert outcome["race-2"] == "enrolled"
        assert (enrolled, left) == (["race-1", "race-2"], 0)
    else:
        assert isinstance(outcome["race-2"], Forbidden), outcome["race-2"]
        assert (enrolled, left) == (["race-1"], 0)
