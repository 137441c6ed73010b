"""opportunity list filter by custom field: GIN index on custom

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 18:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# `?custom.<key>=value` is JSONB containment (`custom @> '{"key": value}'`, crm_platform.custom_field_filters),
# which this index serves on PostgreSQL, as for accounts and contacts. SQLite scans.
def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_opportunities_custom_gin ON opportunities USING gin (custom jsonb_path_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_opportunities_custom_gin")
