"""leads: the scoring generation each lead was scored under, for rescoring after a rule change

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-11 09:00:00

A change of a scoring rule or of the grade thresholds left every existing lead's score and grade as
they were until the lead next changed. Now every such write moves a generation on
(`scoring_generation`, one row), each lead records the generation it was scored under, and a job of
the service rescores the open leads scored under an older one, in batches.

The column's default is a constant, so PostgreSQL adds it without rewriting the table. Existing
leads record generation 0 and the generation starts at 1: they were scored under rules that may
have changed since (the fault this revision fixes), so the job checks each open lead once after the
upgrade. Only the leads whose score or grade moves get a new version, history and `lead.scored`.

The job walks open leads by generation through a partial index whose predicate is
`leads.repository.OPEN_LEADS`, which its query repeats word for word (as 0009's). SQLite, the small
embedded default, scans.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in leads.repository.OPEN_LEADS when this revision was written (a migration does not follow
# later code).
_PREDICATE = "status IN ('new', 'contacted', 'qualified', 'recycled')"


def upgrade() -> None:
    # Not in a batch: on SQLite a batch may copy the table, which would drop 0006's triggers on it.
    op.add_column("leads", sa.Column("scoring_generation", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "scoring_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO scoring_generation (id, generation) VALUES (1, 1)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_leads_scoring_due ON leads (scoring_generation) WHERE {_PREDICATE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_leads_scoring_due")
    op.drop_table("scoring_generation")
    op.drop_column("leads", "scoring_generation")
