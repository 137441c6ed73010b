"""lead activities: a version for optimistic concurrency; follow-up tasks know their activity

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 09:00:00

An activity can be corrected or deleted under If-Match: every change adds 1, so a stale version is
refused (412) instead of overwriting a correction it never saw. Existing activities start at 1.

A follow-up task names the activity that planned it (`activity_id`, "" for first-contact tasks),
so it can follow when that activity's `next_follow_up_at` is corrected or the activity deleted.
Existing follow-up tasks get theirs: the activity of the same lead with the same follow-up time
logged last before the task was created (ids are time-ordered), as logging made them together.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lead_activities") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))
    with op.batch_alter_table("lead_tasks") as batch:
        batch.add_column(sa.Column("activity_id", sa.String(36), nullable=False, server_default=""))
    op.execute(
        """
        UPDATE lead_tasks SET activity_id = COALESCE(
            (SELECT a.id FROM lead_activities a
             WHERE a.lead_id = lead_tasks.lead_id AND a.next_follow_up_at = lead_tasks.due_at
               AND a.id <= lead_tasks.id
             ORDER BY a.id DESC LIMIT 1),
            '')
        WHERE kind = 'follow_up'
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("lead_tasks") as batch:
        batch.drop_column("activity_id")
    with op.batch_alter_table("lead_activities") as batch:
        batch.drop_column("version")
