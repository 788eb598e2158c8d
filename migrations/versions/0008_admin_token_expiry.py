"""admin_tokens: expires_at (an optional lifetime; NULL: until revoked, as every token so far)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.db

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", server.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # in place, as in 0005 (SQLite >= 3.35 drops a column without recreating the table)
        op.execute("ALTER TABLE admin_tokens DROP COLUMN expires_at")
    else:
        op.drop_column("admin_tokens", "expires_at")
