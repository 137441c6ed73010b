"""opportunities: an index on campaign_id

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 12:00:00

Why: the deals a campaign brought are listed (`?campaign_id=`), and a campaign is deleted only while
no deal names it: both look deals up by campaign.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_opportunities_campaign", "opportunities", ["campaign_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_opportunities_campaign", table_name="opportunities")
