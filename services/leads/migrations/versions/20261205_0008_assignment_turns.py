"""round-robin turns instead of a pointer to the previous rep

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 10:00:00

A round-robin create used to read the rule's pointer (the rep who got its previous lead) under the
rule's row lock and move it in its insert, so every create under one rule queued on that row from
its pick to its commit. A rule now counts its turns, and a create takes one: on PostgreSQL from a
sequence of the rule's own, which locks nothing (made and dropped with the rule by triggers); on
SQLite (one writer at a time) from the rule's `turns` column. The rotation goes on where the
pointer left it.

Expand only: `last_user_id` stays, unused by this release, for the previous one, which keeps moving
it while it serves during the rollout (and after a rollback); a later release drops it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The sequence of a rule is named after it (leads.repository._TURNS_SEQUENCE reads it by name) and
# starts at the rule's `turns`: 0 for a new rule, where the pointer left off for an existing one.
_PG_FUNCTIONS = (
    """
CREATE FUNCTION assignment_turns_create() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I MINVALUE 0 START WITH %s',
                   'assignment_turns_' || NEW.id, NEW.turns);
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION assignment_turns_drop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP SEQUENCE IF EXISTS %I', 'assignment_turns_' || OLD.id);
    RETURN NULL;
END $$
""",
)
_PG_TRIGGERS = (
    "CREATE TRIGGER assignment_rules_turns_create AFTER INSERT ON assignment_rules"
    " FOR EACH ROW EXECUTE FUNCTION assignment_turns_create()",
    "CREATE TRIGGER assignment_rules_turns_drop AFTER DELETE ON assignment_rules"
    " FOR EACH ROW EXECUTE FUNCTION assignment_turns_drop()",
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("assignment_rules", sa.Column("turns", sa.BigInteger(), server_default="0", nullable=False))
    # The next turn is the pointer's rep's place in the list plus one.
    if postgres:
        op.execute(
            "UPDATE assignment_rules AS r SET turns = COALESCE((SELECT u.place FROM"
            " jsonb_array_elements_text(r.user_ids) WITH ORDINALITY AS u(rep, place)"
            " WHERE u.rep = r.last_user_id LIMIT 1), 0)"
        )
        for statement in (*_PG_FUNCTIONS, *_PG_TRIGGERS):
            op.execute(statement)
        op.execute(
            "DO $$ DECLARE r record; BEGIN FOR r IN SELECT id, turns FROM assignment_rules LOOP"
            " EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I MINVALUE 0 START WITH %s',"
            " 'assignment_turns_' || r.id, r.turns); END LOOP; END $$"
        )
    else:
        op.execute(
            "UPDATE assignment_rules SET turns = COALESCE((SELECT CAST(u.key AS INTEGER) + 1 FROM"
            " json_each(assignment_rules.user_ids) AS u WHERE u.value = assignment_rules.last_user_id LIMIT 1), 0)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DO $$ DECLARE r record; BEGIN FOR r IN SELECT id FROM assignment_rules LOOP"
            " EXECUTE format('DROP SEQUENCE IF EXISTS %I', 'assignment_turns_' || r.id); END LOOP; END $$"
        )
        op.execute("DROP TRIGGER assignment_rules_turns_create ON assignment_rules")
        op.execute("DROP TRIGGER assignment_rules_turns_drop ON assignment_rules")
        op.execute("DROP FUNCTION assignment_turns_create()")
        op.execute("DROP FUNCTION assignment_turns_drop()")
    # The previous release goes on from its own pointer.
    with op.batch_alter_table("assignment_rules") as batch:
        batch.drop_column("turns")
