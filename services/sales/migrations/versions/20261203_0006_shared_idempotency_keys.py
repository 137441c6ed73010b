"""idempotency keys in the shared shape of crm_platform.idempotency (every key kept)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from crm_platform.idempotency import idempotency_table
from crm_platform.migrations import replace_table

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The table as revision 0001 made it, for the downgrade.
OWN_SHAPE = sa.Table(
    "idempotency_keys",
    sa.MetaData(),
    sa.Column("operation", sa.String(length=64), nullable=False),
    sa.Column("key", sa.String(length=200), nullable=False),
    sa.Column("resource_id", sa.String(length=36), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("operation", "key"),
)


def upgrade() -> None:
    replace_table(op, idempotency_table(sa.MetaData(), fingerprinted=False), _to_shared)


def downgrade() -> None:
    replace_table(op, OWN_SHAPE, _to_own)


def _to_shared(row: Any) -> dict[str, Any]:
    # Sales keys are not per caller (an ERP's external reference is one key whoever posts it).
    return {"operation": row["operation"], "caller": "", "key": row["key"], "result": row["resource_id"],
            "created_at": row["created_at"]}  # fmt: skip


def _to_own(row: Any) -> dict[str, Any]:
    return {"operation": row["operation"], "key": row["key"], "resource_id": row["result"],
            "created_at": row["created_at"]}  # fmt: skip
