"""segments: a version for optimistic concurrency

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:00:00

Every change of a segment adds 1, so a PATCH with a stale If-Match is refused (412) instead of
overwriting a change it never saw. Existing segments start at 1.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("version")
