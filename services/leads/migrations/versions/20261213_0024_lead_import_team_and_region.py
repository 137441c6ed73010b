"""lead imports: the team and region of who started each, so an import is seen in the record scope
its leads are (a team manager sees their reps' imports), not by its owner and admins alone

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-13 11:00:00

Imports before the upgrade have neither: they stay visible to their owner and to callers with every
lead in scope, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lead_imports", sa.Column("team", sa.String(200), nullable=False, server_default=""))
    op.add_column("lead_imports", sa.Column("region", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("lead_imports") as batch:
        batch.drop_column("region")
        batch.drop_column("team")
