"""kb articles listed by update

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 08:00:00

Why: the knowledge-base list without a search is paged by keyset cursors, newest update first;
an index on (updated_at, id) gives each page without sorting every article.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kb_articles", schema=None) as batch_op:
        batch_op.create_index("ix_kb_articles_updated", ["updated_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("kb_articles", schema=None) as batch_op:
        batch_op.drop_index("ix_kb_articles_updated")
