"""tickets: the first resolution, kept through reopenings

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-09 09:00:00

Why: a ticket once resolved is a service record (SLA and CSAT reports) that DeleteTicket refuses, but
a reopening clears `resolved_at`, and a reopened ticket worked on again is `in_progress` like one never
resolved. Existing tickets take their resolution as far as it left a trace: the return visit it
scheduled (created at the first resolution), the current resolution, or the survey that followed one.
A ticket reopened before this revision and worked on since, without a visit or survey, left none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("first_resolved_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        """
        UPDATE tickets SET first_resolved_at = COALESCE(
            (SELECT MIN(v.created_at) FROM return_visits v WHERE v.ticket_id = tickets.id),
            resolved_at,
            (SELECT MIN(c.submitted_at) FROM csat_responses c WHERE c.ticket_id = tickets.id)
        )
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("first_resolved_at")
