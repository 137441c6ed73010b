"""activities.outcome and next_follow_up_at, tasks.activity_id: an activity on an account says what
came of it and plans its follow-up task, as one on a lead does

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 15:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("outcome", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("next_follow_up_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("activity_id", sa.String(36), nullable=False, server_default=""))
        batch.create_index("ix_tasks_activity", ["activity_id"])


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_activity")
        batch.drop_column("activity_id")
    with op.batch_alter_table("activities") as batch:
        batch.drop_column("next_follow_up_at")
        batch.drop_column("outcome")
