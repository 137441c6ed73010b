"""rm_tickets: when each SLA breach was reported, and when the resolution clock stopped

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-21 09:30:00

Why: the service desk lifts a breach that no longer holds once a priority or tier change moves the
due time, and the service report follows it: a later version of the ticket judges a breach again by
when it was reported and where the clock stands. Breaches reported before this revision have no
time (NULL) and stay as they were reported; a rebuild (`crm-analytics rebuild`) gives them theirs.
A clock stopped before this revision (a ticket waiting for the customer, or resolved) is judged at
the version's own time until the ticket moves on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_tickets") as batch:
        batch.add_column(sa.Column("first_response_breached_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resolution_breached_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resolution_paused_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rm_tickets") as batch:
        batch.drop_column("resolution_paused_at")
        batch.drop_column("resolution_breached_at")
        batch.drop_column("first_response_breached_at")
