"""idempotency keys: the fingerprint of the request that used the key

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 09:00:00

Why: crm_platform.migrations.add_idempotency_fingerprints.
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import add_idempotency_fingerprints, drop_idempotency_fingerprints

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_idempotency_fingerprints(op)


def downgrade() -> None:
    drop_idempotency_fingerprints(op)
