"""`fleet keys rotate|retire-director|export` write audit rows (actor ``cli``) to the server's
database, the one `fleet admin token create` uses; never key material."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from server.admin.tables import AuditEntry
from server.cli import main
from server.config import Settings
from server.db import Database
from server.trust.director import Director
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
