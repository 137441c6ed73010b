"""rm_pipelines: pipelines and their stage order, from the pipeline events

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-18 09:00:00

Why: the funnel of a pipeline lists its open stages in the pipeline's order, those without a deal
too, which only sales knows: it now publishes `pipeline.created`, `pipeline.updated` and
`pipeline.deleted`. A pipeline no event told of (the default one the sales database is seeded
with, one created before those events) keeps the default pipeline's order until it is changed.
Pipeline events an analytics without this revision skipped come back with a rebuild
(`crm-analytics rebuild`, which replays every topic).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rm_pipelines",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), server_default="", nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("is_default", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("rm_pipelines")
