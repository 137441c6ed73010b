"""targets: sales targets per owner or team and period (业绩达成率)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-17 10:00:00

Why: attainment compares what an owner or a team won in a month or a quarter with its target.
A target names an owner (with the owner's team, so a manager's team scope covers it) or a team
(owner_id ""); one per owner and period and one per team and period, each a partial unique index.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Money: exact NUMERIC on PostgreSQL, integer ten-thousandths on SQLite (see sales.repository.Amount).
AMOUNT = sa.Numeric(20, 4).with_variant(sa.BigInteger(), "sqlite")
OWNER_TARGET = sa.text("owner_id <> ''")
TEAM_TARGET = sa.text("owner_id = ''")


def upgrade() -> None:
    op.create_table(
        "targets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("team", sa.String(length=200), server_default="", nullable=False),
        sa.Column("region", sa.String(length=200), server_default="", nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("first_month", sa.Integer(), nullable=False),
        sa.Column("last_month", sa.Integer(), nullable=False),
        sa.Column("amount", AMOUNT, server_default="0", nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("set_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "uq_targets_owner_period",
        "targets",
        ["owner_id", "period"],
        unique=True,
        postgresql_where=OWNER_TARGET,
        sqlite_where=OWNER_TARGET,
    )
    op.create_index(
        "uq_targets_team_period",
        "targets",
        ["team", "period"],
        unique=True,
        postgresql_where=TEAM_TARGET,
        sqlite_where=TEAM_TARGET,
    )
    op.create_index("ix_targets_team_months", "targets", ["team", "first_month"], unique=False)
    op.create_index("ix_targets_created", "targets", ["created_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_table("targets")
