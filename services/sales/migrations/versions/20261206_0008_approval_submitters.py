"""who submitted a contract for approval and who created a quote (separation of duties)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 09:00:00

Why: an approver may not decide on what they submitted. Records older than this revision keep ""
(the submitter was not recorded), which the rule reads as unknown; their other rule (one person,
one step of a submission) applies to them as well.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("contracts") as batch_op:
        batch_op.add_column(sa.Column("submitted_by", sa.String(length=200), nullable=False, server_default=""))
    with op.batch_alter_table("quotes") as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("quotes") as batch_op:
        batch_op.drop_column("created_by")
    with op.batch_alter_table("contracts") as batch_op:
        batch_op.drop_column("submitted_by")
