"""lead_engagements: a lead's engagements listed newest first (ListLeadEngagements), by an index on
the lead, when each happened and its id

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-19 09:00:00

Why: the list pages by (occurred_at, id) within one lead; neither index of 0030 (by external id, by
kind) holds that order, so each page would sort all of a lead's engagements.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_lead_engagements_lead_time", "lead_engagements", ["lead_id", "occurred_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_lead_engagements_lead_time", table_name="lead_engagements")
