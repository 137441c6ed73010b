"""rm_activities: each activity's version, so an older snapshot never replaces a newer one

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-17 09:00:00

Why: after a merge an account activity's `activity.logged` is keyed by the duplicate and its
`activity.updated` by the survivor, so the two may be applied in either order (late, or on a
rebuild); unversioned, the logged snapshot could undo the correction. Rows projected before this
revision start at 0, which any event of theirs (version 1 and up) replaces.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rm_activities") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("rm_activities") as batch:
        batch.drop_column("version")
