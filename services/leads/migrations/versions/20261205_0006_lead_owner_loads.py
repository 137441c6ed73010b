"""open leads per owner, kept by triggers (assignment caps and least-loaded picks read it)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 05:00:00

Assignment used to count a rule's reps' open leads on every create, under the rule's row lock: a
scan that grew with every lead they held and serialized all creates behind it. The count is now a
row per owner, kept by the database on every write to `leads` (whatever statement makes it), so
it cannot drift from the leads themselves.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# leads.domain.OPEN_STATUSES as of this revision (a later change to it needs a revision of its own).
_OPEN = "'new', 'contacted', 'qualified', 'recycled'"

# PostgreSQL: one statement-level trigger per event, over its transition tables, so a COPY or a
# multi-row insert of an import batch adds one upsert per owner rather than one per lead. Owners
# are upserted in order, so two transactions moving leads between the same owners lock their rows
# in the same order and cannot deadlock. (A trigger with transition tables may have one event only.)
_PG_FUNCTION = f"""
CREATE FUNCTION leads_count_open_by_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO lead_owner_loads AS l (owner_id, open_leads)
        SELECT owner_id, count(*) FROM new_leads
         WHERE owner_id <> '' AND status IN ({_OPEN}) GROUP BY owner_id ORDER BY owner_id
        ON CONFLICT (owner_id) DO UPDATE SET open_leads = l.open_leads + EXCLUDED.open_leads;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO lead_owner_loads AS l (owner_id, open_leads)
        SELECT owner_id, -count(*) FROM old_leads
         WHERE owner_id <> '' AND status IN ({_OPEN}) GROUP BY owner_id ORDER BY owner_id
        ON CONFLICT (owner_id) DO UPDATE SET open_leads = l.open_leads + EXCLUDED.open_leads;
    ELSE
        INSERT INTO lead_owner_loads AS l (owner_id, open_leads)
        SELECT owner_id, sum(delta) FROM (
            SELECT owner_id, 1 AS delta FROM new_leads WHERE owner_id <> '' AND status IN ({_OPEN})
            UNION ALL
            SELECT owner_id, -1 FROM old_leads WHERE owner_id <> '' AND status IN ({_OPEN})
        ) AS moved GROUP BY owner_id HAVING sum(delta) <> 0 ORDER BY owner_id
        ON CONFLICT (owner_id) DO UPDATE SET open_leads = l.open_leads + EXCLUDED.open_leads;
    END IF;
    RETURN NULL;
END $$
"""
# Every rep of an assignment rule has a row (0 to start with): a create reads its rule's reps' rows
# with row locks, to wait for the transactions assigning to them and see what they committed, and
# a row that does not exist yet cannot be waited for.
_PG_RULE_REPS_FUNCTION = """
CREATE FUNCTION lead_owner_loads_for_rule() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lead_owner_loads (owner_id, open_leads)
    SELECT rep, 0 FROM jsonb_array_elements_text(NEW.user_ids) AS rep ORDER BY rep
    ON CONFLICT (owner_id) DO NOTHING;
    RETURN NULL;
END $$
"""
_PG_RULE_REPS_TRIGGER = (
    "CREATE TRIGGER assignment_rules_reps_loads AFTER INSERT OR UPDATE OF user_ids ON assignment_rules"
    " FOR EACH ROW EXECUTE FUNCTION lead_owner_loads_for_rule()"
)
_PG_TRIGGERS = (
    "CREATE TRIGGER leads_open_loads_insert AFTER INSERT ON leads REFERENCING NEW TABLE AS new_leads"
    " FOR EACH STATEMENT EXECUTE FUNCTION leads_count_open_by_owner()",
    "CREATE TRIGGER leads_open_loads_update AFTER UPDATE ON leads"
    " REFERENCING OLD TABLE AS old_leads NEW TABLE AS new_leads"
    " FOR EACH STATEMENT EXECUTE FUNCTION leads_count_open_by_owner()",
    "CREATE TRIGGER leads_open_loads_delete AFTER DELETE ON leads REFERENCING OLD TABLE AS old_leads"
    " FOR EACH STATEMENT EXECUTE FUNCTION leads_count_open_by_owner()",
)


# SQLite (the embedded default) has row triggers only.
def _sqlite_triggers() -> tuple[str, ...]:
    def counted(row: str) -> str:
        return f"{row}.owner_id <> '' AND {row}.status IN ({_OPEN})"

    add = (
        "INSERT INTO lead_owner_loads (owner_id, open_leads) VALUES (NEW.owner_id, 1)"
        " ON CONFLICT (owner_id) DO UPDATE SET open_leads = open_leads + 1;"
    )
    remove = "UPDATE lead_owner_loads SET open_leads = open_leads - 1 WHERE owner_id = OLD.owner_id;"
    return (
        f"CREATE TRIGGER leads_open_loads_insert AFTER INSERT ON leads WHEN {counted('NEW')} BEGIN {add} END",
        f"CREATE TRIGGER leads_open_loads_delete AFTER DELETE ON leads WHEN {counted('OLD')} BEGIN {remove} END",
        # Old side first: a lead that stays with its owner is taken off and put back.
        f"CREATE TRIGGER leads_open_loads_update_old AFTER UPDATE OF owner_id, status ON leads"
        f" WHEN {counted('OLD')} BEGIN {remove} END",
        f"CREATE TRIGGER leads_open_loads_update_new AFTER UPDATE OF owner_id, status ON leads"
        f" WHEN {counted('NEW')} BEGIN {add} END",
    )


_SQLITE_TRIGGER_NAMES = ("insert", "delete", "update_old", "update_new")


def upgrade() -> None:
    op.create_table(
        "lead_owner_loads",
        sa.Column("owner_id", sa.String(length=200), primary_key=True),
        sa.Column("open_leads", sa.Integer(), nullable=False),
    )
    # Triggers first: creating them locks `leads` against writes until the migration commits, so no
    # lead written meanwhile is missed by both the triggers and the counts below.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        for statement in _PG_TRIGGERS:
            op.execute(statement)
        op.execute(_PG_RULE_REPS_FUNCTION)
        op.execute(_PG_RULE_REPS_TRIGGER)
    else:
        for statement in _sqlite_triggers():
            op.execute(statement)
    op.execute(
        "INSERT INTO lead_owner_loads (owner_id, open_leads)"
        f" SELECT owner_id, count(*) FROM leads WHERE owner_id <> '' AND status IN ({_OPEN}) GROUP BY owner_id"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "INSERT INTO lead_owner_loads (owner_id, open_leads)"
            " SELECT DISTINCT rep, 0 FROM assignment_rules, jsonb_array_elements_text(user_ids) AS rep"
            " ON CONFLICT (owner_id) DO NOTHING"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER leads_open_loads_{event} ON leads")
        op.execute("DROP FUNCTION leads_count_open_by_owner()")
        op.execute("DROP TRIGGER assignment_rules_reps_loads ON assignment_rules")
        op.execute("DROP FUNCTION lead_owner_loads_for_rule()")
    else:
        for name in _SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER leads_open_loads_{name}")
    op.drop_table("lead_owner_loads")
