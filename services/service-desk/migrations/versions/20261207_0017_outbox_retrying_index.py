"""the outbox's index of rows that failed at least once, for the relay's claim

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 09:00:00

Why: crm_platform.migrations.index_retrying_outbox_rows.
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import drop_retrying_outbox_rows_index, index_retrying_outbox_rows

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    index_retrying_outbox_rows(op)


def downgrade() -> None:
    drop_retrying_outbox_rows_index(op)
