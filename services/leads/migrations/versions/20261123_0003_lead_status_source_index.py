"""lead list index: status + source, newest first

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The lead list filtered by status and source (the default work queue view), newest first. With
# only the one-column indexes, PostgreSQL walks the primary key backwards and filters; when the
# status's leads are old (converted, recycled, ...) that reads most of the table: 35-65 ms at
# 1,000,000 leads in bench/bench_leads.py, under 1 ms with this index.
def upgrade() -> None:
    with op.batch_alter_table("leads") as batch_op:
        batch_op.create_index("ix_leads_status_source_id", ["status", "source", "id"])


def downgrade() -> None:
    with op.batch_alter_table("leads") as batch_op:
        batch_op.drop_index("ix_leads_status_source_id")
