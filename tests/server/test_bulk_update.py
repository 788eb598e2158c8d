"""server/bulk.py ``bulk_update``: rows may set different columns; each row gets its own values."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import event

from server.bulk import bulk_update
from server.devices.tables import Device
from tests.helpers.device_rows import device_row


def test_rows_setting_different_columns_are_each_updated_with_their_own_values(ctx):
    now = datetime.now(UTC)
    ids = [f"bu-{i}" for i in range(5)]
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [device_row(d, now) for d in ids])
    statements: list[str] = []

    def on_execute(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        statements.append(statement)

    rows = [
        {"id": "bu-0", "last_report_seq": 10},
        {"id": "bu-1", "last_report_seq": 11, "serving": {"det": "2.0.0"}},
        {"id": "bu-2", "last_report_seq": 12},
        {"id": "bu-3"},  # nothing to set: skipped
        {"id": "bu-4", "status": "online", "serving": {"det": "1.0.0"}, "last_report_seq": 14},
    ]
    event.listen(ctx.db.engine, "before_cursor_execute", on_execute)
    try:
        with ctx.db.session_scope() as s:
            assert bulk_update(s, Device.__table__, rows) == len(rows)
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", on_execute)
    assert sum(1 for st in statements if st.lstrip().upper().startswith("UPDATE")) == 3  # one per column set
    with ctx.db.session_scope() as s:
        q = sa.select(Device.id, Device.status, Device.serving, Device.last_report_seq)
        q = q.where(Device.id.in_(ids))
        got = {r.id: (r.status, r.serving, r.last_report_seq) for r in s.execute(q)}
    assert got == {
        "bu-0": ("enrolled", {}, 10),
        "bu-1": ("enrolled", {"det": "2.0.0"}, 11),
        "bu-2": ("enrolled", {}, 12),
        "bu-3": ("enrolled", {}, 0),
        "bu-4": ("online", {"det": "1.0.0"}, 14),
    }
