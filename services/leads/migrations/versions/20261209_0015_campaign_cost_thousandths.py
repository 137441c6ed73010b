"""campaigns: costs to the thousandth, the minor unit of BHD, IQD, JOD, KWD, LYD, OMR and TND

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-09 09:00:00

A campaign cost of 12.345 KWD is taken now (crm_platform.money.minor_unit): NUMERIC(18, 2) rounded
it to 12.35 on PostgreSQL. Widening keeps every stored cost as it is. Narrowing back rounds a third
decimal away: the earlier release takes and shows 2 places only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.alter_column("cost_amount", type_=sa.Numeric(18, 3), existing_type=sa.Numeric(18, 2))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.alter_column("cost_amount", type_=sa.Numeric(18, 2), existing_type=sa.Numeric(18, 3))
