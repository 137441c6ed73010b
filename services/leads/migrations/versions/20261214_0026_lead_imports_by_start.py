"""lead imports: listed newest first (ListLeadImports), by an index on when each started

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-14 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_lead_imports_started_at_id", "lead_imports", ["started_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_lead_imports_started_at_id", table_name="lead_imports")
