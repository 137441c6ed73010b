"""write_replays: the kept answers of writes sent with Idempotency-Key whose service takes no key
(updates, deletes, state changes), so a retry under the key answers with the first result

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 15:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "write_replays",
        sa.Column("caller", sa.String(220), nullable=False),
        sa.Column("route", sa.String(300), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.String(32), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("caller", "route", "key"),
    )
    op.create_index("ix_write_replays_created_at", "write_replays", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_write_replays_created_at", table_name="write_replays")
    op.drop_table("write_replays")
