"""idempotency keys: the fingerprint of the request that used the key

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 09:00:00

Why: crm_platform.migrations.add_idempotency_fingerprints.
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import add_idempotency_fingerprints, drop_idempotency_fingerprints

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_idempotency_fingerprints(op)


def downgrade() -> None:
    drop_idempotency_fingerprints(op)
