"""processed events: an index on when each was processed, for the inbox expiry job

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-15 09:00:00

Why: crm_platform.migrations.add_processed_events_expiry (the inbox no longer grows for ever).
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import add_processed_events_expiry, drop_processed_events_expiry

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_processed_events_expiry(op)


def downgrade() -> None:
    drop_processed_events_expiry(op)
