"""rollouts: rollback_started_at (the rollback's own clock; the stage keeps its start)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rollback_started_at", server.db.UTCDateTime(timezone=True), nullable=True))
    # rollbacks under way kept their start in stage_started_at until now
    op.execute(
        "UPDATE rollouts SET rollback_started_at = stage_started_at WHERE status = 'rolling_back'"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # in place, as in 0005: batch mode would recreate the table under live foreign keys
        op.execute("ALTER TABLE rollouts DROP COLUMN rollback_started_at")
    else:
        op.drop_column("rollouts", "rollback_started_at")
