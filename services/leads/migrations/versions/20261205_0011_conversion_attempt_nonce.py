"""lead conversions: a random part in each attempt's upstream keys

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 19:30:00

The upstream idempotency keys of a conversion were `lead-convert:<lead>:<attempt>:<step>`, which a
caller can predict and use first on a create of its own: the saga then took that record for one it
created, and undoing a failed attempt deleted it. Each attempt now draws a nonce into its keys.
Attempts started before keep the empty nonce, so they resume with the keys they began with.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.add_column(sa.Column("attempt_nonce", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.drop_column("attempt_nonce")
