"""merged accounts in the accounts projection

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 08:00:00

Why: a merged-away account was deleted from the projection, so a merge applied before the merge of
an account into it (different keys: any order) left that account's tickets on a dead id, and a new
ticket could name one. The projection now remembers where each merged account went.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("account_tiers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("merged_into_id", sa.String(length=64), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("account_tiers", schema=None) as batch_op:
        batch_op.drop_column("merged_into_id")
