"""contact_keys: the contact's version, and a tombstone for a deleted contact

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-10 10:00:00

contact.deleted now clears the contact's keys, so a lead captured later is not linked to it; the
row stays with `deleted_at` set so that a created or updated of the contact applied after the
deletion does not bring the keys back, and `version` keeps an older snapshot from replacing a newer
one. Existing rows start at version 0 (any event of them applies). Contacts deleted before this
release keep their keys here: their deletions were consumed and ignored.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("contact_keys") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # The tombstones would read as contacts without keys, which is what they are now.
    with op.batch_alter_table("contact_keys") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("version")
