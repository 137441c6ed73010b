"""lead conversions: the owner an attempt makes its account, contact and deal for

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-20 09:00:00

Why: an attempt interrupted by an outage is resumed by a later request, but the lead may have changed
hands since (a bulk transfer moves such a lead): resumed, it would finish with records made for the
former owner. `owner_id` is the lead's owner when the attempt began, and an attempt is resumed only
while the lead still has that owner (else undone and begun again). Attempts begun before are taken
as begun for the owner their lead has now, which is what was assumed of them until this release. A
replica of an earlier release begins attempts with `owner_id` empty: one of those resumed by this
release, on a lead with an owner, is undone and begun again rather than resumed, which is safe.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(200), nullable=False, server_default=""))
    op.execute(
        "UPDATE lead_conversions SET owner_id = COALESCE("
        "(SELECT leads.owner_id FROM leads WHERE leads.id = lead_conversions.lead_id), '')"
    )


def downgrade() -> None:
    with op.batch_alter_table("lead_conversions") as batch:
        batch.drop_column("owner_id")
