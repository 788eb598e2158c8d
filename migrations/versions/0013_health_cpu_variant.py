"""health windows: the variant that served them, CPU time per request and resident memory; the
variant and the request-weighted CPU sums in health rollups

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # added in place; windows stored before have none (NULL), rollups folded before sum to 0
    with op.batch_alter_table("health_windows", schema=None) as batch_op:
        batch_op.add_column(sa.Column("variant", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("cpu_ms_per_request", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rss_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("health_rollups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("variant", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("cpu_requests", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("cpu_weighted_ms", sa.Float(), server_default="0", nullable=False))


def drop_columns(table: str, columns: Sequence[str]) -> None:
    for name in columns:
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")  # in place, as in 0009
        else:
            op.drop_column(table, name)


def downgrade() -> None:
    drop_columns("health_rollups", ("variant", "cpu_requests", "cpu_weighted_ms"))
    drop_columns("health_windows", ("variant", "cpu_ms_per_request", "rss_bytes"))
