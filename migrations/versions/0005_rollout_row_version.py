"""rollout row version (optimistic concurrency between the engine and operator actions)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("row_version", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # not batch mode: it would recreate the table, and with foreign keys on, dropping the old
        # one cascades into every deployment (SQLite >= 3.35 drops a column in place)
        op.execute("ALTER TABLE rollouts DROP COLUMN row_version")
    else:
        op.drop_column("rollouts", "row_version")
