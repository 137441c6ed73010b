"""account_merges: accounts merged away, and the account each one's merges end at

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-16 09:00:00

Why: the contacts consumer now applies crm.accounts.v1 account.merged (SPEC §5): converted leads
naming the duplicate are re-pointed to the survivor. Merges of one chain (a into b, b into c) come
under different keys, in any order, and a conversion may finish into an account merged meanwhile:
the table remembers where each duplicate ended, so both end at the last survivor. Merges consumed
before this release were ignored and are not in it. A partial index finds the leads converted into
an account (its predicate is `leads.repository.CONVERTED_INTO_ACCOUNT`, which the consumer's query
repeats, as for 0009); SQLite scans.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "account_merges",
        sa.Column("duplicate_id", sa.String(36), primary_key=True),
        sa.Column("survivor_id", sa.String(36), nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_account_merges_survivor", "account_merges", ["survivor_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE INDEX ix_leads_converted_account ON leads (converted_account_id) WHERE converted_account_id <> ''"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_leads_converted_account")
    op.drop_index("ix_account_merges_survivor", table_name="account_merges")
    op.drop_table("account_merges")
