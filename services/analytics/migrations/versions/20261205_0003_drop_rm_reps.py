"""drop rm_reps: the rep report counts each record under its own owner and team

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 16:40:00

Why: rm_reps kept one team per rep, the team of whichever event was applied last, so the rep report
put a rep's records under an arbitrary team and ignored the records' own scope. The report now reads
each record's owner, team and region. Read models built before this release also lack the merge
re-pointing and count installments' paid amounts differently: run `crm-analytics rebuild` after it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_reps", schema=None) as batch_op:
        batch_op.drop_index("ix_rm_reps_team")
    op.drop_table("rm_reps")


def downgrade() -> None:
    # Empty: the previous release fills it again when the read models are rebuilt.
    op.create_table(
        "rm_reps",
        sa.Column("owner_id", sa.String(length=100), nullable=False),
        sa.Column("team", sa.Text(), server_default="", nullable=False),
        sa.Column("region", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("owner_id"),
    )
    with op.batch_alter_table("rm_reps", schema=None) as batch_op:
        batch_op.create_index("ix_rm_reps_team", ["team"], unique=False)
