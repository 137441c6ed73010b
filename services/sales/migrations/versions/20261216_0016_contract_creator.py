"""contracts: who created the contract (separation of duties)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-16 10:00:00

Why: the approver of a contract was only compared with its submitter, so a sales manager could
create a contract (setting its terms and another owner), have the owner submit it, and approve it
alone below the finance threshold. Whoever created a contract now decides no step of it, as its
submitter does not. Existing contracts keep "" (creator unknown), which the rule reads as unknown:
they are not backfilled from `submitted_by`, since the person who submitted a contract need not be
the one who created it, and that guess would refuse approvers who may decide. For them only the
submitter and one-person-one-step rules apply.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("contracts") as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("contracts") as batch_op:
        batch_op.drop_column("created_by")
