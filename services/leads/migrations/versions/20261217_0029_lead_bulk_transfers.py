"""lead_bulk_transfers: bulk transfers of a departing rep's leads to another

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-17 09:00:00

Why: a departing rep's open leads go to another rep in one request (SPEC §5, 人走客户不走), as their
accounts do (the accounts service's `bulk_transfers`). Each transfer is recorded with what it moved,
so that a repeat of its idempotency key answers with the same result. Expand only: a release before
this one neither reads nor writes the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lead_bulk_transfers",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("from_owner_id", sa.String(200), nullable=False),
        sa.Column("to_owner_id", sa.String(200), nullable=False),
        sa.Column("to_team", sa.String(200), server_default="", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("leads", sa.Integer(), nullable=False),
        sa.Column("tasks", sa.Integer(), nullable=False),
        sa.Column("actor_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lead_bulk_transfers")
