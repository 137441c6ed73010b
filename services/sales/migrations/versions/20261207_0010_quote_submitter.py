"""quotes: who submitted the current line items for approval

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 09:00:00

Why: a quote's line items can change until it is decided (UpdateQuote), which submits them for
approval again; whoever changed them must not approve them, while its creator, who did not submit
this version, may. Existing quotes were submitted by their creator.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("quotes") as batch_op:
        batch_op.add_column(sa.Column("submitted_by", sa.String(length=200), nullable=False, server_default=""))
    op.execute("UPDATE quotes SET submitted_by = created_by")


def downgrade() -> None:
    with op.batch_alter_table("quotes") as batch_op:
        batch_op.drop_column("submitted_by")
