"""web forms: a version for optimistic concurrency

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 10:00:00

Every change of a form adds 1, so a PATCH with a stale If-Match is refused (412) instead of
overwriting a change it never saw. Existing forms start at 1.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webforms") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("webforms") as batch:
        batch.drop_column("version")
