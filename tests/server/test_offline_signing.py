"""The offline targets key through the API and `fleet model sign`: pushes and revocations are staged
while the key is away, signed on a "workstation" (the CLI with the key file), and then published and
reflected in the catalog; a real ngclient installs what was signed."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Targets

from server.cli import common, main
from server.client import FleetClient
from server.trust.keys import load_private_key, write_private_key
from server.trust.repository import ROLE_KEY_FILES, sign_staged_targets
from server.trust.rotation import export_key
from tests.helpers.catalog import Boom, audit_actions, nothing_published, push, push_upload
from tests.helpers.tuf_client import enroll_device, target_url, updater

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def vault(ctx, tmp_path: Path) -> Path:
    """The targets key, moved off the server (``fleet keys export targets``)."""
    return export_key(ctx.repo, Targets.type, tmp_path / "vault" / "targets.key")


@pytest.fixture
def sign(app_client, admin_headers, monkeypatch):
    """Run ``fleet model sign ARGS`` against the test app; returns the click result."""
    token = admin_headers["Authorization"].split(" ", 1)[1]
    transport = app_client._transport
    monkeypatch.setattr(
        common,
        "api_client",
        lambda url, tok, **kw: FleetClient("http://testserver", tok, transport=transport),
    )

    def run(*args: str, input: str | None = None):
        return CliRunner().invoke(
            main, ["model", "sign", *args], env={"FLEET_TOKEN": token}, input=input,
            catch_exceptions=False,
        )

    return run


def versions(app_client, headers, name: str) -> dict[str, dict]:
    r = app_client.get(f"/api/v1/models/{name}/versions", headers=headers)
    assert r.status_code == 200, r.text
    return {v["version"]: v for v in r.json()}


def test_push_staged_signed_on_the_workstation_then_installed(
    app_client, admin_headers, ctx, onnx_model, vault, sign, tmp_path
):
    r = push(app_client, admin_headers, "clf", "1.0.0", onnx_model())
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"
    assert r.json()["variants"][0]["published"] is False
    assert ctx.repo.list_targets() == {}  # nothing a device trusts lists it yet
    device = enroll_device(app_client, admin_headers, "cam-001")
    r = app_client.put(
        "/api/v1/devices/cam-001/desired", json={"model": "clf", "version": "1.0.0"}, headers=admin_headers
    )
    assert r.status_code == 404, r.text  # a pending version cannot be assigned

    staged = app_client.get("/api/v1/repository/targets/staged", headers=admin_headers)
    assert staged.status_code == 200, staged.text
    body = staged.json()
    assert [t["path"] for t in body["listed"]] == ["clf/1.0.0/default/bundle.tar"]
    assert body["listed"][0]["custom"]["release"] == 1
    assert (body["current_version"], body["version"]) == (1, 2)
    assert body["metadata"]["signatures"] == []

    answered = sign("--targets-key", str(vault), input="n\n")  # the signer looks, and declines
    assert answered.exit_code == 1, answered.output
    assert ctx.repo.list_targets() == {}

    result = sign("--targets-key", str(vault), "--yes")
    assert result.exit_code == 0, result.output
    assert "now listed: clf@1.0.0 (default)" in result.output
    v = versions(app_client, admin_headers, "clf")["1.0.0"]
    assert v["status"] == "active"
    assert v["variants"][0]["published"] is True
    assert app_client.get("/api/v1/repository/targets/staged", headers=admin_headers).status_code == 404
    [entry] = audit_actions(app_client, admin_headers, "repository.targets_signed")
    assert entry["details"]["listed"] == ["clf/1.0.0/default/bundle.tar"]
    assert not ctx.repo.has_key(Targets.type)  # the key never came near the server

    up, _ = updater(app_client, device, tmp_path / "dev")
    up.refresh()
    info = up.get_targetinfo("clf/1.0.0/default/bundle.tar")
    assert info is not None
    assert info.hashes["sha256"] == v["variants"][0]["sha256"]
    assert Path(up.download_target(info)).stat().st_size == v["variants"][0]["length"]
    r = app_client.put(
        "/api/v1/devices/cam-001/desired", json={"model": "clf", "version": "1.0.0"}, headers=admin_headers
    )
    assert r.status_code == 200, r.text


def test_revocation_is_staged_and_takes_the_file_once_signed(
    app_client, admin_headers, ctx, onnx_model, vault, sign
):
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    assert sign("--targets-key", str(vault), "--yes").exit_code == 0
    art = versions(app_client, admin_headers, "clf")["1.0.0"]["variants"][0]
    stored = ctx.repo.repo_dir / target_url(art).removeprefix("/tuf/")

    r = app_client.delete("/api/v1/models/clf/versions/1.0.0", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"  # at once: nothing can be assigned or rolled out
    assert "clf/1.0.0/default/bundle.tar" in ctx.repo.list_targets()  # until the signature
    assert stored.exists()
    staged = app_client.get("/api/v1/repository/targets/staged", headers=admin_headers).json()
    assert [t["path"] for t in staged["unlisted"]] == ["clf/1.0.0/default/bundle.tar"]

    result = sign("--targets-key", str(vault), "--yes")
    assert result.exit_code == 0, result.output
    assert "no longer listed: clf/1.0.0/default/bundle.tar" in result.output
    assert ctx.repo.list_targets() == {}
    assert not stored.exists()


def test_a_pending_push_revoked_before_signing_leaves_nothing(
    app_client, admin_headers, ctx, onnx_model, vault
):
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    r = app_client.delete("/api/v1/models/clf/versions/1.0.0", headers=admin_headers)
    assert r.json()["status"] == "revoked"
    assert app_client.get("/api/v1/repository/targets/staged", headers=admin_headers).status_code == 404
    assert [p for p in ctx.repo.targets_dir.rglob("*") if p.is_file()] == []


def test_wrong_key_stale_and_malformed_signatures_are_refused(
    app_client, admin_headers, ctx, onnx_model, vault, sign, tmp_path
):
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    stranger = tmp_path / "stranger.key"
    write_private_key(stranger, Ed25519PrivateKey.generate())
    result = sign("--targets-key", str(stranger), "--yes")
    assert result.exit_code == 1
    assert "is not a targets key of the repository's current root" in " ".join(result.output.split())

    staged = app_client.get("/api/v1/repository/targets/staged", headers=admin_headers).json()
    expires = datetime.now(UTC) + timedelta(days=1)
    r = app_client.put(
        "/api/v1/repository/targets",
        content=sign_staged_targets(staged["metadata"], Ed25519PrivateKey.generate(), expires),
        headers=admin_headers,
    )
    assert r.status_code == 422, r.text
    assert "not signed by the root's targets key" in r.json()["detail"]
    r = app_client.put("/api/v1/repository/targets", content=b"{]", headers=admin_headers)
    assert r.status_code == 422, r.text
    signed = sign_staged_targets(staged["metadata"], load_private_key(vault), expires)
    assert push(app_client, admin_headers, "clf", "1.1.0", onnx_model("b.onnx", seed=2)).status_code == 201
    r = app_client.put("/api/v1/repository/targets", content=signed, headers=admin_headers)
    assert r.status_code == 409, r.text  # the stage moved on since it was fetched
    assert "not what is staged" in r.json()["detail"]
    viewer = app_client.post(
        "/api/v1/admin/tokens", json={"name": "v", "role": "viewer"}, headers=admin_headers
    ).json()["token"]
    r = app_client.put(
        "/api/v1/repository/targets", content=signed, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert r.status_code == 403
    assert ctx.repo.list_targets() == {}
    assert {v["status"] for v in versions(app_client, admin_headers, "clf").values()} == {"pending"}


def test_a_tampered_stored_bundle_is_caught_on_the_workstation(
    app_client, admin_headers, ctx, onnx_model, vault, sign
):
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    [stored] = list(ctx.repo.targets_dir.rglob("*.tar"))
    data = bytearray(stored.read_bytes())
    data[-600] ^= 0xFF  # same length, other content: a compromised server swapping the bundle
    stored.write_bytes(bytes(data))
    result = sign("--targets-key", str(vault), "--yes")
    assert result.exit_code == 1
    assert "differs from its staged length or sha256" in " ".join(result.output.split())
    assert ctx.repo.list_targets() == {}


def test_key_back_on_the_server_publishes_what_was_staged(app_client, admin_headers, ctx, onnx_model, vault):
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    shutil.copy(vault, ctx.repo.key_dir / ROLE_KEY_FILES[Targets.type])  # a publish window
    assert push(app_client, admin_headers, "clf", "1.1.0", onnx_model("b.onnx", seed=2)).status_code == 201
    assert {v: d["status"] for v, d in versions(app_client, admin_headers, "clf").items()} == {
        "1.0.0": "active",
        "1.1.0": "active",
    }
    assert sorted(ctx.repo.list_targets()) == ["clf/1.0.0/default/bundle.tar", "clf/1.1.0/default/bundle.tar"]


def test_renewal_on_request_and_nothing_to_sign(app_client, admin_headers, ctx, vault, sign):
    result = sign("--targets-key", str(vault), "--yes")
    assert result.exit_code == 0
    assert "nothing is staged" in result.output
    before = ctx.repo.versions()["targets"]
    result = sign("--targets-key", str(vault), "--yes", "--renew")
    assert result.exit_code == 0, result.output
    assert ctx.repo.versions()["targets"] == before + 1
    assert "now listed: none" in result.output


def test_a_staged_variant_of_an_active_version_is_not_assigned_until_signed(
    app_client, admin_headers, ctx, onnx_model, vault, sign
):
    key_file = ctx.repo.key_dir / ROLE_KEY_FILES[Targets.type]
    shutil.copy(vault, key_file)  # a publish window for 1.0.0
    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    key_file.unlink()  # and closed again
    r = push(app_client, admin_headers, "clf", "1.0.0", onnx_model(), variant="small")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"  # the version is out already; only the new variant waits
    assert {a["variant"]: a["published"] for a in r.json()["variants"]} == {"default": True, "small": False}
    enroll_device(app_client, admin_headers, "cam-001")
    want = {"model": "clf", "version": "1.0.0", "variant": "small"}
    r = app_client.put("/api/v1/devices/cam-001/desired", json=want, headers=admin_headers)
    assert r.status_code in (404, 422), r.text
    assert sign("--targets-key", str(vault), "--yes").exit_code == 0
    r = app_client.put("/api/v1/devices/cam-001/desired", json=want, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["variant"] == "small"


def test_a_signature_published_without_its_database_write_is_reconciled(
    app_client, admin_headers, ctx, onnx_model, vault
):
    """The metadata went out but the catalog's commit did not (a crash in between): the refresh
    job (and start-up) bring the catalog in line with what is signed."""
    from server.app import _reconcile_catalog

    assert push(app_client, admin_headers, "clf", "1.0.0", onnx_model()).status_code == 201
    staged = app_client.get("/api/v1/repository/targets/staged", headers=admin_headers).json()
    expires = datetime.now(UTC) + timedelta(days=1)
    signed = sign_staged_targets(staged["metadata"], load_private_key(vault), expires)
    ctx.repo.publish_signed_targets(signed)  # straight to the repository: no catalog update
    assert versions(app_client, admin_headers, "clf")["1.0.0"]["status"] == "pending"
    _reconcile_catalog(ctx, False)
    assert versions(app_client, admin_headers, "clf")["1.0.0"]["status"] == "active"


def test_a_staged_push_whose_transaction_fails_leaves_nothing(ctx, onnx_model, vault, tmp_path):
    """Staged, then the transaction fails: the stage is as it was and the stored bundle is gone."""
    from server.admin.service import CLI_PRINCIPAL
    from server.catalog.service import CatalogService

    upload = push_upload(ctx, tmp_path, onnx_model(), "1.0.0")
    seen = {}

    def push_then_fail() -> None:
        with ctx.db.session_scope() as session:
            CatalogService(session, ctx).push("clf", upload, CLI_PRINCIPAL)
            seen["staged"] = ctx.repo.staged_targets()
            seen["stored"] = list(ctx.repo.targets_dir.rglob("*.tar"))
            raise Boom

    with pytest.raises(Boom):
        push_then_fail()
    assert seen["staged"] is not None
    assert len(seen["stored"]) == 1
    assert ctx.repo.staged_targets() is None
    nothing_published(ctx)


def test_fleet_model_push_says_staged_while_the_key_is_away(
    app_client, admin_headers, onnx_model, vault, sign, tmp_path
):
    token = admin_headers["Authorization"].split(" ", 1)[1]
    result = CliRunner().invoke(
        main, ["model", "push", "clf", "1.0.0", str(onnx_model())], env={"FLEET_TOKEN": token},
        catch_exceptions=False,
    )  # the sign fixture points the CLI at the test app
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith("staged clf 1.0.0 (release 1)")
    assert "fleet model sign --targets-key PATH" in text
    assert sign("--targets-key", str(vault), "--yes").exit_code == 0
    result = CliRunner().invoke(
        main, ["model", "push", "clf", "1.1.0", str(onnx_model("b.onnx", seed=2))],
        env={"FLEET_TOKEN": token}, catch_exceptions=False,
    )
    assert " ".join(result.output.split()).startswith("staged clf 1.1.0 (release 2)")
