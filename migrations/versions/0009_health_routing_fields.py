"""health windows: the hybrid routing fields (who answered, escalations, cloud round trip and
agreement), and their sums in health rollups

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WINDOW_COUNTS = (
    "answered_edge", "answered_cloud", "answered_cache", "escalations", "budget_limited", "breaker_open",
    "cloud_failed", "cloud_compared",
)  # fmt: skip
WINDOW_FLOATS = ("escalation_rate", "cloud_p95_ms", "cloud_agreement")
ROLLUP_SUMS = (
    "routed_requests", "answered_edge", "answered_cloud", "answered_cache", "escalations", "budget_limited",
    "breaker_open", "cloud_failed", "cloud_compared", "cloud_p95_calls",
)  # fmt: skip
ROLLUP_FLOATS = ("cloud_agreement_weighted", "cloud_p95_weighted_ms")


def upgrade() -> None:
    # added in place (ALTER TABLE ... ADD COLUMN, also on SQLite); windows stored before have none
    # (NULL), rollups folded before sum to 0
    with op.batch_alter_table("health_windows", schema=None) as batch_op:
        for name in WINDOW_COUNTS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
        for name in WINDOW_FLOATS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
    with op.batch_alter_table("health_rollups", schema=None) as batch_op:
        for name in ROLLUP_SUMS:
            batch_op.add_column(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
        for name in ROLLUP_FLOATS:
            batch_op.add_column(sa.Column(name, sa.Float(), server_default="0", nullable=False))


def drop_columns(table: str, columns: Sequence[str]) -> None:
    for name in columns:
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")  # in place, as in 0005
        else:
            op.drop_column(table, name)


def downgrade() -> None:
    drop_columns("health_rollups", ROLLUP_SUMS + ROLLUP_FLOATS)
    drop_columns("health_windows", WINDOW_COUNTS + WINDOW_FLOATS)
