"""audit_events.client_address: where each audited request came from

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 04:00:00

Why: a refused login or export must be traceable to its source (SPEC §9); rows written before
this have it empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("client_address", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("client_address")
