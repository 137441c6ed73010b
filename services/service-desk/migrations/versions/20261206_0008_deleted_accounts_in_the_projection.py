"""deleted accounts in the accounts projection

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 08:00:00

Why: an AccountDeleted event closes the account's tickets, and the account takes no new ones.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("account_tiers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account_tiers", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
