"""payment plans: a version for optimistic concurrency

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 10:00:00

Why: a plan's installments can be replaced (UpdatePaymentPlan); each replacement adds 1, so one
made with a stale If-Match is refused (412) instead of undoing a change it never saw. Existing
plans start at 1.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("payment_plans") as batch_op:
        batch_op.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("payment_plans") as batch_op:
        batch_op.drop_column("version")
