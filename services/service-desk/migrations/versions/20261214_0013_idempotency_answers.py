"""idempotency keys: the answer the key's first request got

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-14 09:00:00

Why: crm_platform.migrations.add_idempotency_answers (SPEC §3: a repeated key returns the first result).
"""

from collections.abc import Sequence

from alembic import op
from crm_platform.migrations import add_idempotency_answers, drop_idempotency_answers

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_idempotency_answers(op)


def downgrade() -> None:
    drop_idempotency_answers(op)
