"""lead_engagements: web behaviour (page views, e-mail opens and clicks, downloads, webinars) that
scoring rules count

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-18 09:00:00

Why: SPEC §4 scores leads by activity counts, and a lead who keeps viewing the product page should
score high (反复看产品页就打个高分), but only sales activities could be counted. A marketing system now
reports engagements (`RecordLeadEngagements`), each unique per lead by the sender's event id so a
resent batch counts nothing twice, and scoring rules count them by kind and URL
(`scoring_rules.engagement_kind`, `url_contains`).

Expand only: the new columns have constant defaults (PostgreSQL adds them without rewriting the
table) and a release before this one neither reads nor writes the new table; its rules keep
working, and an engagement rule written by this release is one it reads as a field condition with no
field (it matches no lead there), until every replica runs this one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lead_engagements",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("lead_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("url", sa.String(2000), server_default="", nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("external_id", sa.String(200), nullable=False),
        sa.Column("actor_id", sa.String(200), server_default="", nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_lead_engagements_external", "lead_engagements", ["lead_id", "external_id"], unique=True)
    op.create_index("ix_lead_engagements_lead_kind", "lead_engagements", ["lead_id", "kind"])
    # Not in a batch: on SQLite a batch may copy the table (as 0019 says of `leads`).
    op.add_column("scoring_rules", sa.Column("engagement_kind", sa.String(20), server_default="", nullable=False))
    op.add_column("scoring_rules", sa.Column("url_contains", sa.String(2000), server_default="", nullable=False))


def downgrade() -> None:
    op.drop_column("scoring_rules", "url_contains")
    op.drop_column("scoring_rules", "engagement_kind")
    op.drop_index("ix_lead_engagements_lead_kind", table_name="lead_engagements")
    op.drop_index("ux_lead_engagements_external", table_name="lead_engagements")
    op.drop_table("lead_engagements")
