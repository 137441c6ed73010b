"""rm_contacts, and rm_opportunities' filled key fields: data completeness of contacts and deals

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-19 09:00:00

Why: the data-completeness report (and rep performance's data completeness) covers contacts and
deals besides leads and accounts. Contacts come from `contact.created`, `contact.updated` and
`contact.deleted`, which analytics skipped before this revision: the contacts those events told of
come with a rebuild (`crm-analytics rebuild`, which replays every topic); until then only contacts
changed from now on are reported. Deals projected before this revision have no filled key fields
(NULL, left out of data completeness) until their next event or a rebuild.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rm_contacts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.Text(), server_default="", nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team", sa.Text(), server_default="", nullable=False),
        sa.Column("region", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("filled", sa.JSON(), nullable=False),
        sa.Column("completeness", sa.Numeric(precision=6, scale=4), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rm_contacts") as batch:
        batch.create_index("ix_rm_contacts_created", ["created_at"], unique=False)
        batch.create_index("ix_rm_contacts_owner", ["owner_id"], unique=False)
        batch.create_index("ix_rm_contacts_team", ["team"], unique=False)
        batch.create_index("ix_rm_contacts_account", ["account_id"], unique=False)
    with op.batch_alter_table("rm_opportunities") as batch:
        batch.add_column(sa.Column("filled", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("completeness", sa.Numeric(precision=6, scale=4), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rm_opportunities") as batch:
        batch.drop_column("completeness")
        batch.drop_column("filled")
    op.drop_table("rm_contacts")
