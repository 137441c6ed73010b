"""forecast covering index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The forecast and win statistics read only these columns (index-only scans on PostgreSQL).
INCLUDED = [
    "owner_id", "team", "region", "currency", "status", "probability_bp", "forecast_category", "amount",
    "pipeline_id", "close_date",
]  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.drop_index("ix_opportunities_forecast")
        batch_op.create_index("ix_opportunities_forecast_cover", ["forecast_month"], postgresql_include=INCLUDED)


def downgrade() -> None:
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.drop_index("ix_opportunities_forecast_cover")
        batch_op.create_index("ix_opportunities_forecast", ["forecast_month", "owner_id"])
