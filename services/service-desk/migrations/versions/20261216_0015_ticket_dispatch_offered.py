"""tickets: when the dispatch timer last offered a queued ticket that no agent could take

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-16 09:00:00

Why: the timer takes the queue a batch at a time, oldest first. Tickets no agent can take (a skill
or region nobody covers) stayed at the head of the queue on every pass, and a batch of them kept
every ticket behind from being offered. An offer no agent took now sends the ticket to the back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dispatch_offered_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("dispatch_offered_at")
