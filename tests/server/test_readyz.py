"""``/healthz`` and ``/readyz`` on both databases: ready at the newest migration, 503 naming what
is not ready otherwise (the connected and failing MQTT cases: tests/integration)."""

from __future__ import annotations

import sqlalchemy as sa

from server.migrate import head_revisions


def test_ready_when_the_database_answers_at_the_newest_migration(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    r = app_client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "not_ready": [],
        "checks": {
            "database": {"ok": True},
            "migrations": {"ok": True, "current": sorted(head_revisions()), "head": sorted(head_revisions())},
        },  # MQTT is off in these settings: no mqtt check
    }


def test_not_ready_when_the_schema_is_behind(app_client, ctx):
    with ctx.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0006'"))
    r = app_client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready"
    assert body["not_ready"] == ["migrations"]
    assert body["checks"]["migrations"]["current"] == ["0006"]
    assert app_client.get("/healthz").status_code == 200  # alive all the same


def test_not_ready_when_the_database_does_not_answer(app_client, ctx):
    ctx.db.engine.dispose()
    ctx.db.engine = sa.create_engine("sqlite:////nonexistent-dir/fleet.db")  # cannot be opened
    r = app_client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["not_ready"] == ["database", "migrations"]
    assert body["checks"]["database"]["error"].startswith("OperationalError: ")
