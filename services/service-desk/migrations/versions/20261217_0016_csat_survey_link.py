"""tickets: the key of the customer's survey link; csat_responses: who gave the answer

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-17 09:00:00

Why: CSAT was entered by staff only. A resolved ticket now has a survey link (a QR code left with
the customer after a repair) whose key lets the customer answer it themselves, without a login: set
the first time the ticket is resolved and kept through reopenings, unique where set. Tickets resolved
before this revision get none here (no backfill: a key is random, drawn per row, and nobody was given
a link for them); one resolved again after a reopening gets its key then. Every answer stored so far
was entered by staff: `channel` is `staff` for them, `customer` for those given through a link.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HAS_SURVEY = sa.text("survey_key IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("survey_key", sa.String(64), nullable=True))
    op.create_index(
        "ux_tickets_survey_key",
        "tickets",
        ["survey_key"],
        unique=True,
        postgresql_where=HAS_SURVEY,
        sqlite_where=HAS_SURVEY,
    )
    with op.batch_alter_table("csat_responses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("channel", sa.String(20), nullable=False, server_default="staff"))


def downgrade() -> None:
    with op.batch_alter_table("csat_responses", schema=None) as batch_op:
        batch_op.drop_column("channel")
    op.drop_index("ux_tickets_survey_key", table_name="tickets")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("survey_key")
