"""opportunities: the product line as anti-collision compares it, indexed

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-16 09:00:00

Why: anti-collision compared product lines exactly, so "cloud erp" or "Cloud  ERP" slipped past an
open "Cloud ERP" deal of another owner. Deals keep the product line as written; `product_line_key`
holds it normalised (`sales.domain.product_line_key`) and replaces `product_line` in the collision
index. A stored column rather than an expression index, which SQLite and PostgreSQL spell
differently and neither can compute (NFKC). Existing deals are backfilled, one UPDATE per distinct
product line.
"""

import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_opportunities = sa.table(
    "opportunities", sa.column("product_line", sa.String()), sa.column("product_line_key", sa.Text())
)


def _product_line_key(product_line: str) -> str:
    """As sales.domain.product_line_key when this revision was written (a migration does not follow
    later code)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", product_line).casefold())
    return " ".join(folded.split())


def upgrade() -> None:
    # Not in a batch: a constant default is added in place on both (PostgreSQL rewrites nothing).
    op.add_column("opportunities", sa.Column("product_line_key", sa.Text(), nullable=False, server_default=""))
    conn = op.get_bind()
    lines = conn.execute(
        sa.select(_opportunities.c.product_line).where(_opportunities.c.product_line != "").distinct()
    ).scalars()
    for line in list(lines):
        conn.execute(
            sa.update(_opportunities)
            .where(_opportunities.c.product_line == line)
            .values(product_line_key=_product_line_key(line))
        )
    op.drop_index("ix_opportunities_collision", table_name="opportunities")
    op.create_index("ix_opportunities_collision", "opportunities", ["account_id", "product_line_key", "status"])


def downgrade() -> None:
    op.drop_index("ix_opportunities_collision", table_name="opportunities")
    op.create_index("ix_opportunities_collision", "opportunities", ["account_id", "product_line", "status"])
    with op.batch_alter_table("opportunities") as batch_op:
        batch_op.drop_column("product_line_key")
