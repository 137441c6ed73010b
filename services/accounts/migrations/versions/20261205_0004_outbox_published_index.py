"""the outbox's published_at index over published rows only

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 08:00:00

Why: crm_platform.migrations.index_published_outbox_rows_only.
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import index_every_outbox_row, index_published_outbox_rows_only

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    index_published_outbox_rows_only(op)


def downgrade() -> None:
    index_every_outbox_row(op)
