"""web forms: an optional honeypot field

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 19:00:00

A form may name a field it hides from people; submissions that fill it are bots' and create no lead.
Existing forms keep none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webforms") as batch:
        batch.add_column(sa.Column("honeypot_field", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("webforms") as batch:
        batch.drop_column("honeypot_field")
