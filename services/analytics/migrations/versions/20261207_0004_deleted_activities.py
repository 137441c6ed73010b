"""rm_deleted_activities: tombstones of activities deleted where they were logged

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 13:00:00

Why: an account's activity events are keyed by the account it is on, so after a merge an activity's
`activity.logged` (under the duplicate's key) may be applied after its `activity.deleted` (under the
survivor's), late or on a rebuild; the tombstone keeps the deleted activity out of the reports.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rm_deleted_activities",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("rm_deleted_activities")
