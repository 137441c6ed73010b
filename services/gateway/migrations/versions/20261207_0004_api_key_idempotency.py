"""api_keys.idempotency_key and request_digest: a create repeated under its Idempotency-Key answers
with the key it created instead of minting a second credential

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("idempotency_key", sa.String(200)))
    op.add_column("api_keys", sa.Column("request_digest", sa.String(64)))
    op.create_index("api_keys_idempotency_key", "api_keys", ["created_by", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("api_keys_idempotency_key", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("request_digest")
        batch.drop_column("idempotency_key")
