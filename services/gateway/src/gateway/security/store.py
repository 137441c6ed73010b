"""The gateway's own database: the append-only audit store, API keys, the kept answers of keyed
writes and the outbox (audit events reach `crm.audit.v1` through it). Migrations: services/gateway/migrations/."""

import asyncio
from pathlib import Path

from crm_platform.db import UtcDateTime
from crm_platform.migrations import upgrade
from crm_platform.outbox import add_messaging_tables
from sqlalchemy import JSON, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

audit_events = Table(
    "audit_events",
    metadata,
    # Time-ordered UUIDv7: ordering by id is ordering by time, and it is the paging cursor.
    Column("id", String(36), primary_key=True),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("actor_id", String(200), nullable=False),
    Column("actor_kind", String(20), nullable=False),
    Column("actor_roles", JSON, nullable=False),
    Column("actor_team", String(200), nullable=False),
    Column("actor_region", String(200), nullable=False),
    Column("action", String(40), nullable=False),
    Column("resource", String(60), nullable=False),
    Column("record_id", String(200), nullable=False),
    Column("outcome", String(10), nullable=False),
    Column("reason", Text, nullable=False),
    Column("fields", JSON, nullable=False),
    Column("before", JSON),
    Column("after", JSON),
    Column("request_id", String(100), nullable=False),
    Column("method", String(10), nullable=False),
    Column("path", Text, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("client_address", String(64), nullable=False, server_default=""),
    Index("ix_audit_events_occurred_at", "occurred_at"),
    Index("ix_audit_events_actor", "actor_id", "id"),
    Index("ix_audit_events_record", "resource", "record_id", "id"),
    Index("ix_audit_events_action", "action", "id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    # SHA-256 of the whole key: keys are 256-bit random, so a fast hash is enough (no brute force).
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(20), nullable=False),
    Column("principal_id", String(200), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("team", String(200), nullable=False),
    Column("region", String(200), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime()),
    Column("revoked_at", UtcDateTime()),
    # The creating request's Idempotency-Key (unique per creator) and the digest of its body: a
    # repeat answers with this key instead of minting a second credential.
    Column("idempotency_key", String(200)),
    Column("request_digest", String(64)),
    Index("api_keys_idempotency_key", "created_by", "idempotency_key", unique=True),
)

# The kept answers of writes sent with Idempotency-Key whose service takes no key (gateway.replays):
# per caller, route and key; `status_code` is null while the first request runs.
write_replays = Table(
    "write_replays",
    metadata,
    Column("caller", String(220), primary_key=True),
    Column("route", String(300), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # Who holds the key: the request that claimed it (or took it over from a stalled one).
    Column("claim_token", String(32), nullable=False),
    Column("status_code", Integer),
    Column("headers", JSON, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Index("ix_write_replays_created_at", "created_at"),
)

outbox, processed_events = add_messaging_tables(metadata)

MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"


def migrate(database_url: str) -> None:
    """Brings the gateway database to the newest revision (blocking)."""
    upgrade(MIGRATIONS_DIR, database_url)


async def migrate_async(database_url: str) -> None:
    await asyncio.to_thread(migrate, database_url)
