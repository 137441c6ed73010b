"""lead conversions: whether the attempt created its contact or links the lead's matched one

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-10 16:00:00

A conversion into an existing account now links the contact the lead matched when it is a live
contact of that account, instead of creating a second one; compensation must then leave that
contact alone. `contact_created` records the attempt's choice (made once, before anything is
created). Every attempt begun before created its contact, so existing rows say true: they resume
and are undone as they were.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.add_column(sa.Column("contact_created", sa.Boolean(), nullable=False, server_default=sa.text("true")))


def downgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.drop_column("contact_created")
