"""lead imports: the SHA-256 of each part received

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-10 09:00:00

A request sent again under an import key answers with the first result only when it sends the
same bytes as the first (422 on `import_key` otherwise), and a part after the import completed is
409: both used to answer 200 and import nothing. Imports begun before this release have no
digests and are not checked.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lead_imports", sa.Column("part_digests", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")))


def downgrade() -> None:
    with op.batch_alter_table("lead_imports") as batch:
        batch.drop_column("part_digests")
