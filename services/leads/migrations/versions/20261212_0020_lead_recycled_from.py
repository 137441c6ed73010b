"""leads: the owner each lead was last recycled from, for the pool's re-claim cool-down

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-12 09:00:00

A rep whose lead went back to the pool (idle for N days, or released) could claim it straight back
with a fresh SLA and recycling window, and so hold it for ever without working it. Now the owner it
was recycled from (`recycled_from_id`, beside `recycled_at`) may not claim it back for a cool-down.

The column's default is a constant, so PostgreSQL adds it without rewriting the table. Leads
recycled before the upgrade record no owner: their previous owners may claim them at once, as
before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Not in a batch: on SQLite a batch may copy the table, which would drop 0006's triggers on it.
    op.add_column("leads", sa.Column("recycled_from_id", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("leads", "recycled_from_id")
