"""rm_contracts: each contract's status

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-17 09:30:00

Why: a terminated contract is written off (sales no longer counts it as a receivable), so its
overdue installments are no churn reason. Contracts projected before this revision have no status
(counted as before) until their next event or a rebuild of the read models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_contracts") as batch:
        batch.add_column(sa.Column("status", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("rm_contracts") as batch:
        batch.drop_column("status")
