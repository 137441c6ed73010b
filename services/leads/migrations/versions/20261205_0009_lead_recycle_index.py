"""an index for the recycling timer: held leads by assignment time

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 15:00:00

The recycling timer read every open lead each run of each replica to find those nobody worked for
N days (at 1,000,000 leads, 324,000 rows and 100-170 ms of database CPU every 30 s). This partial
index holds only the leads it can recycle, by assignment time: a run walks them oldest first and
stops at its batch. Its predicate is `leads.repository.RECYCLING_CANDIDATES`, which the timer's
query repeats word for word (PostgreSQL proves the index usable from that, also under a generic
plan). SQLite, the small embedded default, keeps scanning.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in leads.repository.RECYCLING_CANDIDATES when this revision was written (a migration does not
# follow later code).
_PREDICATE = "status IN ('new', 'contacted') AND owner_id <> '' AND assigned_at IS NOT NULL"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_leads_recycle_due ON leads (assigned_at) WHERE {_PREDICATE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_leads_recycle_due")
