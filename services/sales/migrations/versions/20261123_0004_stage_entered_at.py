"""when a deal entered its stage (rotting deals)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.add_column(sa.Column("stage_entered_at", sa.DateTime(timezone=True), nullable=True))
    # Existing deals: their last change is the best known stage entry.
    op.execute("UPDATE opportunities SET stage_entered_at = updated_at WHERE stage_entered_at IS NULL")
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.create_index("ix_opportunities_rotting", ["status", "stage", "stage_entered_at"])


def downgrade() -> None:
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.drop_index("ix_opportunities_rotting")
        batch_op.drop_column("stage_entered_at")
