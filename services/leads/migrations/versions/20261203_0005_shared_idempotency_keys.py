"""idempotency keys in the shared shape of crm_platform.idempotency (every key kept)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:00:00
"""

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from crm_platform.idempotency import idempotency_table
from crm_platform.migrations import replace_table

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The table as revision 0001 made it, for the downgrade.
OWN_SHAPE = sa.Table(
    "idempotency_keys",
    sa.MetaData(),
    sa.Column("operation", sa.String(length=50), nullable=False),
    sa.Column("key", sa.String(length=200), nullable=False),
    sa.Column("principal_id", sa.String(length=200), server_default="", nullable=False),
    sa.Column("response", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("operation", "principal_id", "key"),
)


def upgrade() -> None:
    replace_table(op, idempotency_table(sa.MetaData(), fingerprinted=False), _to_shared)


def downgrade() -> None:
    replace_table(op, OWN_SHAPE, _to_own)


def _to_shared(row: Any) -> dict[str, Any]:
    # Leads remembered a JSON document as bytes; the shared table keeps it as JSON.
    return {"operation": row["operation"], "caller": row["principal_id"], "key": row["key"],
            "result": json.loads(row["response"]), "created_at": row["created_at"]}  # fmt: skip


def _to_own(row: Any) -> dict[str, Any]:
    return {"operation": row["operation"], "principal_id": row["caller"], "key": row["key"],
            "response": json.dumps(row["result"]).encode(), "created_at": row["created_at"]}  # fmt: skip
