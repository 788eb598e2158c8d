"""model_artifacts: measurements (size, agreement with fp32 and latency ratio of a variant built
and measured on push, e.g. ``--quantize int8``)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-11 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.db

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in place (ALTER TABLE ... ADD COLUMN, also on SQLite), as in 0010
    with op.batch_alter_table("model_artifacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("measurements", server.db.JSONType, server_default="{}", nullable=False)
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE model_artifacts DROP COLUMN measurements")  # in place, as in 0005
    else:
        op.drop_column("model_artifacts", "measurements")
