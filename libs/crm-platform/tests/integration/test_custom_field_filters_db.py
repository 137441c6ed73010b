"""The shared custom field filters on real databases (SQLite and PostgreSQL): every type matches
what was stored through crm_platform.custom_fields.coerce, and on PostgreSQL the containment is
served by a GIN `jsonb_path_ops` index, as the services' migrations create it."""

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm_platform import custom_fields as cf
from crm_platform.custom_field_filters import custom_clauses, load_filters
from crm_platform.custom_fields_service import definitions_table
from crm_platform.db import create_engine
from crm_platform.errors import ValidationFailed
from crm_platform.timeutil import utcnow
from sqlalchemy import JSON, Column, MetaData, String, Table, bindparam, insert, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

DEFINITIONS = [
    cf.FieldDefinition("lead", "note", "Note", cf.FieldType.TEXT),
    cf.FieldDefinition("lead", "seats", "Seats", cf.FieldType.NUMBER),
    cf.FieldDefinition("lead", "budget", "Budget", cf.FieldType.DECIMAL),
    cf.FieldDefinition("lead", "renewal", "Renewal", cf.FieldType.DATE),
    cf.FieldDefinition("lead", "vip", "VIP", cf.FieldType.BOOL),
    cf.FieldDefinition("lead", "channel", "Channel", cf.FieldType.ENUM, options=("direct", "partner")),
    cf.FieldDefinition("lead", "products", "Products", cf.FieldType.MULTI_ENUM, options=("crm", "erp", "bi")),
    cf.FieldDefinition("lead", "billing_email", "Billing", cf.FieldType.EMAIL, pii=True),
]
# What the services store: values validated and coerced to their canonical form.
STORED = {
    "r1": {"note": "alpha", "seats": 12.0, "budget": "12.50", "renewal": "2026-12-01", "vip": True,
           "channel": "partner", "products": ["erp", "crm"], "billing_email": "Ops@Example.com"},
    "r2": {"note": "beta", "seats": 3, "vip": False, "channel": "direct", "products": ["bi"]},
    "r3": {"seats": 12.5, "note": "12"},
    "r4": {},
}  # fmt: skip

metadata = MetaData()
records = Table(
    "records",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("custom", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
)
definitions = definitions_table(metadata, "custom_field_definitions")


@pytest.fixture
async def engine(each_database_url: str) -> AsyncIterator[Any]:
    engine = create_engine(each_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        if engine.dialect.name == "postgresql":
            await conn.execute(text("CREATE INDEX ix_records_custom_gin ON records USING gin (custom jsonb_path_ops)"))
        now = utcnow()
        rows = [
            {"entity": d.entity, "key": d.key, "label": d.label, "type": d.type.value, "required": False,
             "options": list(d.options), "pii": d.pii, "created_at": now, "version": 1}
            for d in DEFINITIONS
        ]  # fmt: skip
        await conn.execute(insert(definitions), rows)
        for record_id, values in STORED.items():
            await conn.execute(insert(records).values(id=record_id, custom=cf.coerce(DEFINITIONS, values)))
    yield engine
    await engine.dispose()


async def matching(engine: AsyncEngine, *pairs: tuple[str, str]) -> list[str]:
    async with engine.connect() as conn:
        filters = await load_filters(conn, definitions, "lead", pairs)
        query = select(records.c.id).where(*custom_clauses(conn, records.c.custom, filters)).order_by(records.c.id)
        return list((await conn.execute(query)).scalars())


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("note", "alpha")], ["r1"]),
        ([("note", "12")], ["r3"]),  # a text "12" is not the number 12
        ([("seats", "12")], ["r1"]),
        ([("seats", "12.0")], ["r1"]),
        ([("seats", "12.5")], ["r3"]),
        ([("budget", "12.50")], ["r1"]),
        ([("renewal", "2026-12-01")], ["r1"]),
        ([("vip", "true")], ["r1"]),
        ([("vip", "false")], ["r2"]),
        ([("channel", "direct")], ["r2"]),
        ([("products", "crm")], ["r1"]),
        ([("products", "bi")], ["r2"]),
        ([("billing_email", "OPS@example.com")], ["r1"]),
        ([("seats", "12"), ("vip", "true")], ["r1"]),
        ([("seats", "12"), ("vip", "false")], []),
        ([], ["r1", "r2", "r3", "r4"]),
    ],
)
async def test_typed_filters_match_the_stored_values(
    engine: AsyncEngine, pairs: list[tuple[str, str]], expected: list[str]
) -> None:
    assert await matching(engine, *pairs) == expected


async def test_unknown_keys_and_ill_typed_values_name_the_field(engine: AsyncEngine) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await matching(engine, ("nope", "1"), ("seats", "many"), ("channel", "retail"))
    assert [e.field for e in caught.value.errors] == ["custom.nope", "custom.seats", "custom.channel"]


@pytest.mark.parametrize("each_database_url", ["postgresql"], indirect=True)
async def test_postgresql_serves_the_filter_from_the_gin_index(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        filters = await load_filters(conn, definitions, "lead", [("channel", "partner")])
        query = select(records.c.id).where(*custom_clauses(conn, records.c.custom, filters))
        await conn.execute(text("SET enable_seqscan = off"))  # four rows: make the planner show the index
        # EXPLAIN of the same statement: its SQL with named parameters, bound as JSONB again.
        compiled = query.compile(dialect=postgresql.dialect())
        sql = re.sub(r"%\((\w+)\)s", r":\1", str(compiled).replace("::JSONB", ""))
        explain = text(f"EXPLAIN {sql}").bindparams(
            *(bindparam(name, value, type_=JSONB()) for name, value in compiled.params.items())
        )
        plan = "\n".join(row[0] for row in await conn.execute(explain))
    assert "ix_records_custom_gin" in plan, plan
