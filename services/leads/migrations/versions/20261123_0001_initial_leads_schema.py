"""initial leads schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 11:51:22.452618
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from crm_platform.migrations import create_messaging_tables, drop_messaging_tables
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "assignment_rules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "regions", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "industries", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "sources", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("min_score", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_score", sa.Integer(), server_default="0", nullable=False),
        sa.Column("team", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "user_ids", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("strategy", sa.String(length=20), nullable=False),
        sa.Column("capacity", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_user_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=100), server_default="", nullable=False),
        sa.Column("cost_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("cost_currency", sa.String(length=3), server_default="", nullable=False),
        sa.Column("starts_on", sa.Date(), nullable=True),
        sa.Column("ends_on", sa.Date(), nullable=True),
        sa.Column("owner_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("team", sa.String(length=200), server_default="", nullable=False),
        sa.Column("region", sa.String(length=200), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.create_index("ix_campaigns_channel", ["channel", "id"], unique=False)

    op.create_table(
        "contact_keys",
        sa.Column("contact_id", sa.String(length=36), nullable=False),
        sa.Column("email_norm", sa.String(length=254), nullable=True),
        sa.Column("phone_norm", sa.String(length=32), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("contact_id"),
    )
    with op.batch_alter_table("contact_keys", schema=None) as batch_op:
        batch_op.create_index("ix_contact_keys_email", ["email_norm"], unique=False)
        batch_op.create_index("ix_contact_keys_phone", ["phone_norm"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("operation", sa.String(length=50), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("principal_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("operation", "principal_id", "key"),
    )
    op.create_table(
        "lead_activities",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("lead_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("outcome", sa.String(length=200), server_default="", nullable=False),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column("actor_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_follow_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("lead_activities", schema=None) as batch_op:
        batch_op.create_index("ix_lead_activities_lead", ["lead_id", "id"], unique=False)

    op.create_table(
        "lead_conversions",
        sa.Column("lead_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("account_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("account_created", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("contact_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("opportunity_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("lead_id"),
    )
    op.create_table(
        "lead_import_rejections",
        sa.Column("import_id", sa.String(length=200), nullable=False),
        sa.Column("row", sa.BigInteger(), nullable=False),
        sa.Column("field", sa.String(length=100), server_default="", nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("import_id", "row"),
    )
    op.create_table(
        "lead_imports",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("format", sa.String(length=10), nullable=False),
        sa.Column("owner_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("rows_seen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("accepted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("merged", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("rejected", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("skipped", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("committed_rows", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("parts_received", sa.Integer(), server_default="0", nullable=False),
        sa.Column("parsed_rows", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes_seen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "csv_header", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("pending", sa.LargeBinary(), server_default="", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "lead_score_history",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("lead_id", sa.String(length=36), nullable=False),
        sa.Column("previous_score", sa.Integer(), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("previous_grade", sa.String(length=1), nullable=False),
        sa.Column("grade", sa.String(length=1), nullable=False),
        sa.Column(
            "matched_rule_ids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("lead_score_history", schema=None) as batch_op:
        batch_op.create_index("ix_lead_score_history_lead", ["lead_id", "id"], unique=False)

    op.create_table(
        "lead_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("grade_a", sa.Integer(), nullable=False),
        sa.Column("grade_b", sa.Integer(), nullable=False),
        sa.Column("grade_c", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "lead_tasks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("lead_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("owner_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("lead_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_lead_tasks_lead", ["lead_id", "status"], unique=False)
        batch_op.create_index("ix_lead_tasks_owner", ["owner_id", "status", "due_at"], unique=False)

    op.create_table(
        "leads",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("company", sa.String(length=200), server_default="", nullable=False),
        sa.Column("title", sa.String(length=200), server_default="", nullable=False),
        sa.Column("phone", sa.String(length=64), server_default="", nullable=False),
        sa.Column("phone_norm", sa.String(length=32), nullable=True),
        sa.Column("email", sa.String(length=254), server_default="", nullable=False),
        sa.Column("email_norm", sa.String(length=254), nullable=True),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("source_detail", sa.String(length=200), server_default="", nullable=False),
        sa.Column("campaign_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("region", sa.String(length=200), server_default="", nullable=False),
        sa.Column("industry", sa.String(length=200), server_default="", nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("score", sa.Integer(), server_default="0", nullable=False),
        sa.Column("grade", sa.String(length=1), server_default="D", nullable=False),
        sa.Column("owner_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("team", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "tags", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "custom", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("external_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("matched_contact_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("disqualified_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("converted_account_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("converted_contact_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("converted_opportunity_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("in_pool", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("follow_up_overdue", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("import_id", sa.String(length=200), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_contact_due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_contacted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recycled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.create_index("ix_leads_campaign_id", ["campaign_id", "id"], unique=False)
        batch_op.create_index("ix_leads_created_at_id", ["created_at", "id"], unique=False)
        batch_op.create_index("ix_leads_email_norm", ["email_norm"], unique=False)
        batch_op.create_index("ix_leads_external_id", ["external_id"], unique=False)
        batch_op.create_index("ix_leads_grade_id", ["grade", "id"], unique=False)
        batch_op.create_index("ix_leads_import_id", ["import_id"], unique=False)
        batch_op.create_index("ix_leads_industry_id", ["industry", "id"], unique=False)
        batch_op.create_index("ix_leads_owner_status", ["owner_id", "status", "id"], unique=False)
        batch_op.create_index("ix_leads_phone_norm", ["phone_norm"], unique=False)
        batch_op.create_index("ix_leads_pool", ["in_pool", "id"], unique=False)
        batch_op.create_index("ix_leads_region_id", ["region", "id"], unique=False)
        batch_op.create_index(
            "ix_leads_sla_due",
            ["first_contact_due_at"],
            unique=False,
            postgresql_where=sa.text("first_contacted_at IS NULL AND NOT follow_up_overdue"),
        )
        batch_op.create_index("ix_leads_source_detail_id", ["source_detail", "id"], unique=False)
        batch_op.create_index("ix_leads_source_id", ["source", "id"], unique=False)
        batch_op.create_index("ix_leads_status_id", ["status", "id"], unique=False)
        batch_op.create_index("ix_leads_team_id", ["team", "id"], unique=False)

    create_messaging_tables(op)
    op.create_table(
        "scoring_rules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("field", sa.String(length=200), server_default="", nullable=False),
        sa.Column("operator", sa.String(length=20), server_default="", nullable=False),
        sa.Column("value", sa.String(length=500), server_default="", nullable=False),
        sa.Column("activity_kind", sa.String(length=20), server_default="", nullable=False),
        sa.Column("min_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "webform_rate",
        sa.Column("form_key", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("form_key", "window_start"),
    )
    op.create_table(
        "webforms",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("form_key", sa.String(length=64), nullable=False),
        sa.Column("campaign_id", sa.String(length=36), server_default="", nullable=False),
        sa.Column("team", sa.String(length=200), server_default="", nullable=False),
        sa.Column("region", sa.String(length=200), server_default="", nullable=False),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("form_key"),
    )


def downgrade() -> None:
    drop_messaging_tables(op)
    op.drop_table("webforms")
    op.drop_table("webform_rate")
    op.drop_table("scoring_rules")
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.drop_index("ix_leads_team_id")
        batch_op.drop_index("ix_leads_status_id")
        batch_op.drop_index("ix_leads_source_id")
        batch_op.drop_index("ix_leads_source_detail_id")
        batch_op.drop_index(
            "ix_leads_sla_due", postgresql_where=sa.text("first_contacted_at IS NULL AND NOT follow_up_overdue")
        )
        batch_op.drop_index("ix_leads_region_id")
        batch_op.drop_index("ix_leads_pool")
        batch_op.drop_index("ix_leads_phone_norm")
        batch_op.drop_index("ix_leads_owner_status")
        batch_op.drop_index("ix_leads_industry_id")
        batch_op.drop_index("ix_leads_import_id")
        batch_op.drop_index("ix_leads_grade_id")
        batch_op.drop_index("ix_leads_external_id")
        batch_op.drop_index("ix_leads_email_norm")
        batch_op.drop_index("ix_leads_created_at_id")
        batch_op.drop_index("ix_leads_campaign_id")

    op.drop_table("leads")
    with op.batch_alter_table("lead_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_lead_tasks_owner")
        batch_op.drop_index("ix_lead_tasks_lead")

    op.drop_table("lead_tasks")
    op.drop_table("lead_settings")
    with op.batch_alter_table("lead_score_history", schema=None) as batch_op:
        batch_op.drop_index("ix_lead_score_history_lead")

    op.drop_table("lead_score_history")
    op.drop_table("lead_imports")
    op.drop_table("lead_import_rejections")
    op.drop_table("lead_conversions")
    with op.batch_alter_table("lead_activities", schema=None) as batch_op:
        batch_op.drop_index("ix_lead_activities_lead")

    op.drop_table("lead_activities")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("contact_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_contact_keys_phone")
        batch_op.drop_index("ix_contact_keys_email")

    op.drop_table("contact_keys")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_index("ix_campaigns_channel")

    op.drop_table("campaigns")
    op.drop_table("assignment_rules")
