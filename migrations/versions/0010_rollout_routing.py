"""rollouts: routing (the policy its DesiredStates carry) and previous_routing (the policies the
devices held before it, what a rollback restores)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.db

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in place (ALTER TABLE ... ADD COLUMN, also on SQLite): a batch rebuild of rollouts would
    # cascade into its deployments under live foreign keys (see 0005)
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routing", server.db.JSONType, nullable=True))
        batch_op.add_column(
            sa.Column("previous_routing", server.db.JSONType, server_default="{}", nullable=False)
        )


def downgrade() -> None:
    for name in ("previous_routing", "routing"):
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE rollouts DROP COLUMN {name}")  # in place, as in 0005
        else:
            op.drop_column("rollouts", name)
