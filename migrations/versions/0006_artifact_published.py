"""model artifacts: published flag (staged for an offline targets signature until signed)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # in place, as in 0005: batch mode would recreate the table under live foreign keys
        op.execute("ALTER TABLE model_artifacts DROP COLUMN published")
    else:
        op.drop_column("model_artifacts", "published")
