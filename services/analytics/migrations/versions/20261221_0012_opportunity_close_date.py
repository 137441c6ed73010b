"""rm_opportunities: the date each deal was won or lost

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-21 09:00:00

Why: rep performance and customer value count a win in the period of its close date (the date the
deal was won, which sales may back-date, and by which its attainment counts the win), not of the
moment the win was recorded. Deals projected before this revision have no close date (NULL,
counted by the moment as before) until their next event or a rebuild (`crm-analytics rebuild`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_opportunities") as batch:
        batch.add_column(sa.Column("close_date", sa.Date(), nullable=True))
        batch.create_index("ix_rm_opportunities_close_date", ["close_date"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rm_opportunities") as batch:
        batch.drop_index("ix_rm_opportunities_close_date")
        batch.drop_column("close_date")
