"""lead imports: when each last made progress, a digest of the rows a resumed part skips, and the
lead a stored rejection duplicates

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-13 10:00:00

- `updated_at`: a `running` import whose process died looked like a live one; now each batch, and
  each part's end or failure, sets it. Imports before the upgrade get their last known time
  (finished, else started).
- `committed_digest`: a part interrupted mid-way and sent again with other rows skipped as many
  of the new rows as had been committed, and answered them as imported. Now the rows committed so
  far are digested with each batch, and a re-run whose skipped rows differ is refused (422). Parts
  interrupted before the upgrade have no digest and are resumed unchecked, as before.
- `lead_import_rejections.lead_id`: the open lead a duplicate row was rejected for, which the
  import's answer named but its stored rejections lost. Rejections before the upgrade have none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lead_imports", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("lead_imports", sa.Column("committed_digest", sa.String(64), nullable=False, server_default=""))
    op.execute("UPDATE lead_imports SET updated_at = COALESCE(finished_at, started_at)")
    op.add_column("lead_import_rejections", sa.Column("lead_id", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("lead_import_rejections") as batch:
        batch.drop_column("lead_id")
    with op.batch_alter_table("lead_imports") as batch:
        batch.drop_column("committed_digest")
        batch.drop_column("updated_at")
