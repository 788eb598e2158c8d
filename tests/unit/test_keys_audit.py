"""`fleet keys rotate|retire-director|export` write audit rows (actor ``cli``) to the server's
database, the one `fleet admin token create` uses; never key material. Also the audit functions
(server/admin/key_audit.py) and the image repository the key commands open (server/trust/local_repo.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from server.admin.key_audit import KeyAuditError, key_audit, record_key_change
from server.admin.tables import AuditEntry
from server.cli import main
from server.config import Settings
from server.db import Database
from server.trust.director import Director
from server.trust.local_repo import NoImageRepository, existing_image_repository, image_repository
from server.trust.repository import ROLE_KEY_FILES, ImageRepository
from server.trust.rotation import RotationError, load_ed25519


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("FLEET_DATA_DIR", str(tmp_path / "data"))
    for name in ("FLEET_DATABASE_URL", "FLEET_KEY_DIR", "FLEET_REPO_DIR"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    ImageRepository(s.repo_dir, s.key_dir).initialize()
    Director(s.key_dir)
    return s


def fleet(args: list[str], code: int = 0) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def audit_rows(settings: Settings) -> list[AuditEntry]:
    db = Database(settings.database_url)
    try:
        with db.session_scope() as session:
            return list(session.query(AuditEntry).order_by(AuditEntry.id))
    finally:
        db.dispose()


def key_material(*paths: Path) -> set[str]:
    """Each private key's PEM body and, for Ed25519 keys, raw bytes as hex."""
    found = set()
    for path in paths:
        body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
        found.add(body)
        with contextlib.suppress(RotationError):  # the fleet CA's key is not Ed25519
            found.add(load_ed25519(path).private_bytes_raw().hex())
    return found


def all_keys(settings: Settings) -> set[str]:
    return key_material(*(p for p in settings.key_dir.glob("*.key") if p.is_file()))


def test_keys_commands_write_audit_rows_to_the_cli_database(settings: Settings, tmp_path: Path) -> None:
    token = fleet(["admin", "token", "create", "--role", "viewer"]).strip()  # the same database
    assert token.startswith("fa.")
    secrets = all_keys(settings)
    offline_root = tmp_path / "offline" / "root.key"

    fleet(["keys", "export", "root", "--out", str(offline_root)])
    fleet(["keys", "rotate", "snapshot", "--root-key", str(offline_root)])
    out = fleet(["keys", "rotate", "director"])
    old_director = out.split("fleet keys retire-director ")[1].split()[0]
    fleet(["keys", "retire-director", old_director])
    secrets |= all_keys(settings) | key_material(offline_root)
    assert len(secrets) >= 10

    rows = audit_rows(settings)
    assert [(r.action, r.actor, r.target_type, r.target_id) for r in rows] == [
        ("token.create", "cli", "admin_token", rows[0].target_id),
        ("key.export", "cli", "key", "root"),
        ("key.rotate", "cli", "key", "snapshot"),
        ("key.rotate", "cli", "key", "director"),
        ("key.retire_director", "cli", "key", "director"),
    ]
    export, snapshot, director, retire = (r.details for r in rows[1:])
    assert export["role"] == "root"
    assert len(export["keyids"]) == 1
    assert snapshot["root_version"] == 2
    assert snapshot["new_keyid"] not in snapshot["old_keyids"]
    assert director["director_list_version"] == 1
    assert director["old_keyids"][0].startswith(old_director)
    assert retire["retired_keyids"] == director["old_keyids"]
    assert retire["director_list"] == [director["new_keyid"]]
    assert retire["director_list_version"] == 2

    text = json.dumps([r.details for r in rows])
    assert "PRIVATE KEY" not in text
    assert str(offline_root) not in text
    assert str(settings.key_dir) not in text
    for secret in secrets:
        assert secret not in text


def test_a_failed_key_command_writes_no_row(settings: Settings) -> None:
    fleet(["keys", "export", "root", "--out", str(settings.data_dir / "off" / "root.key")])
    out = fleet(["keys", "rotate", "snapshot"], code=1)  # the root key is offline now
    assert "--root-key" in out
    assert [r.action for r in audit_rows(settings)] == ["key.export"]


def test_no_audit_database_no_key_change(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FLEET_DATABASE_URL", f"sqlite:///{blocker}/fleet.db")
    root_key = settings.key_dir / ROLE_KEY_FILES["root"]
    before = root_key.read_bytes()
    out = fleet(["keys", "export", "root", "--out", str(tmp_path / "off" / "root.key")], code=1)
    text = "".join(out.split())  # rich wraps at the terminal width, even inside the path
    assert text.startswith(f"error:cannotopentheauditdatabasesqlite:///{blocker}/fleet.db:")
    assert text.endswith("Nokeywaschanged.")
    assert root_key.read_bytes() == before
    assert not (tmp_path / "off" / "root.key").exists()
    fleet(["keys", "rotate", "director"], code=1)
    fleet(["keys", "status"])  # read-only: needs no database


def test_an_interrupted_rotation_resolved_by_the_next_command_is_audited(settings: Settings) -> None:
    """A rotation killed between writing ``<key>.new`` and its rename is completed or discarded
    by the next `fleet keys` command (`keys status` included): a key change like any other, it
    gets its audit row."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.trust.keys import write_private_key

    stray = settings.key_dir / "tuf-timestamp.key.new"
    write_private_key(stray, Ed25519PrivateKey.generate())
    fleet(["keys", "status"])
    assert not stray.exists()
    [row] = [r for r in audit_rows(settings) if r.action == "key.rotation_resolved"]
    assert row.actor == "cli"
    assert "discarded tuf-timestamp.key.new" in row.details["outcomes"][0]
    assert not all_keys(settings) & set(json.dumps(row.details).split('"'))


def test_key_audit_refuses_before_the_change_and_records_only_success(
    settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    changed: list[str] = []
    with (
        pytest.raises(KeyAuditError, match=r"cannot open the audit database .*No key was changed"),
        key_audit(f"sqlite:///{blocker}/fleet.db", "key.rotate", "snapshot"),
    ):
        changed.append("snapshot")  # never runs
    assert changed == []

    def failed_rotation() -> None:
        with key_audit(settings.database_url, "key.rotate", "targets") as details:
            details["new_keyid"] = "abc"
            raise RotationError("the rotation failed half way")

    with pytest.raises(RotationError):
        failed_rotation()
    with key_audit(settings.database_url, "key.export", "root") as details:
        details["keyids"] = ["k1"]
    assert [(r.action, r.target_id, r.details) for r in audit_rows(settings)] == [
        ("key.export", "root", {"role": "root", "keyids": ["k1"]})
    ]


def test_a_key_change_row_that_cannot_be_written_is_an_error_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    url = f"sqlite:///{blocker}/fleet.db"
    with pytest.raises(KeyAuditError, match=r"audit row key\.rotation_resolved not written"):
        record_key_change(url, "key.rotation_resolved", "interrupted-rotation", {})


def test_the_key_commands_need_a_repository_the_server_made(settings: Settings, tmp_path: Path) -> None:
    assert existing_image_repository(settings).repo_dir == settings.repo_dir
    elsewhere = Settings(data_dir=tmp_path / "empty")
    with pytest.raises(NoImageRepository, match=r"no image repository in .*start the server once"):
        existing_image_repository(elsewhere)
    assert image_repository(elsewhere).lifetimes["timestamp"].total_seconds() == elsewhere.timestamp_expiry_s
