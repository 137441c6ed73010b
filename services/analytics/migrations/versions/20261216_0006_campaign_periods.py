"""rm_campaigns: each campaign's run (starts_on, ends_on)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-16 09:00:00

Why: the lead-sources report by campaign lists a campaign that brought no lead in the period it ran
(cost spent, ROI -1), which needs the run. Campaigns projected before this revision have none until
their next event (or a rebuild of the read models).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_campaigns") as batch:
        batch.add_column(sa.Column("starts_on", sa.Date(), nullable=True))
        batch.add_column(sa.Column("ends_on", sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rm_campaigns") as batch:
        batch.drop_column("ends_on")
        batch.drop_column("starts_on")
