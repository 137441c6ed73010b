"""ticket list filter by custom field: custom as jsonb with a GIN index

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
# which json cannot do: on PostgreSQL the column becomes jsonb, as the other services store custom
# values, served by a GIN index as for accounts and contacts. SQLite keeps its JSON text.
def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE tickets ALTER COLUMN custom DROP DEFAULT")
        op.execute("ALTER TABLE tickets ALTER COLUMN custom TYPE jsonb USING custom::jsonb")
        op.execute("ALTER TABLE tickets ALTER COLUMN custom SET DEFAULT '{}'::jsonb")
        op.execute("CREATE INDEX ix_tickets_custom_gin ON tickets USING gin (custom jsonb_path_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_tickets_custom_gin")
        op.execute("ALTER TABLE tickets ALTER COLUMN custom DROP DEFAULT")
        op.execute("ALTER TABLE tickets ALTER COLUMN custom TYPE json USING custom::json")
        op.execute("ALTER TABLE tickets ALTER COLUMN custom SET DEFAULT '{}'::json")
