"""lead settings: a version of the grade thresholds, for optimistic concurrency

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-13 09:00:00

The grade thresholds were set without If-Match: an admin could overwrite thresholds another had
just set, never having seen them. Now every setting adds 1 to their version (`version`), which
their listing sends as an ETag and a stale If-Match is refused with (412).

Thresholds set before the upgrade start at 1, as the defaults do while none are set: an If-Match
read before the upgrade did not exist, so none can be stale by it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lead_settings") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("lead_settings") as batch:
        batch.drop_column("version")
