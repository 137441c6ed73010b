"""assignment rules: the team whose leads a rule matches (`lead_team`)

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-13 11:00:00

A team manager's rule was held to the manager's scope by its `team` alone: put first with no
condition, it took every new lead of the company, other teams' too, to the manager's team. Now a
rule may match only the leads of one team (`lead_team`), and a team manager's rules always do,
their team's: a team's queue.

Rules stored before the upgrade get "" (any lead), so they route as they did; one a team manager
made is theirs to change again only once an admin gives it their team's `lead_team`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("assignment_rules", sa.Column("lead_team", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("assignment_rules") as batch:
        batch.drop_column("lead_team")
