"""activities: a version for optimistic concurrency

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 09:00:00

An activity can be corrected or deleted under If-Match: every change adds 1, so a stale version is
refused (412) instead of overwriting a correction it never saw. Existing activities start at 1.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.drop_column("version")
