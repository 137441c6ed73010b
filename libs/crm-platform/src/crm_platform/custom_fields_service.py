"""Custom field definitions served over gRPC (crm.common.v1.CustomFieldService): the table, its
queries and the one servicer every owning service registers for the entities it owns.

Each service keeps its own database, so each declares the table in its metadata (its Alembic
migration creates it with these columns) and registers the servicer on its gRPC server:

    custom_fields = definitions_table(metadata, "custom_field_definitions")
    servicer = CustomFieldServicer(engine, custom_fields, keys=idempotency_keys, entities=("account", "contact"))
    custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(servicer, server)

and validates its records against `await load_definitions(conn, custom_fields, "account")` with
crm_platform.custom_fields. Definition changes emit no events: only the owning service reads them.
"""

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from crm.common.v1 import custom_fields_pb2 as pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crm_platform import custom_fields as cf
from crm_platform import idempotency
from crm_platform.db import UtcDateTime, insert_ignore, transaction
from crm_platform.errors import AlreadyExists, FieldError, NotFound, StaleVersion, ValidationFailed
from crm_platform.principal import current_principal
from crm_platform.timeutil import to_timestamp, utcnow

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CustomFieldService"].full_name
RESOURCE = "custom field"


def definitions_table(metadata: MetaData, name: str) -> Table:
    """Adds a service's definitions table to its metadata (the names predate this module)."""
    return Table(
        name,
        metadata,
        Column("entity", String(20), nullable=False),
        Column("key", String(63), nullable=False),
        Column("label", String(cf.MAX_LABEL), nullable=False),
        Column("type", String(20), nullable=False),
        Column("required", Boolean, nullable=False),
        # json or jsonb on PostgreSQL, as each service's migration made it: a list is stored alike in both.
        Column("options", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        Column("pii", Boolean, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("version", BigInteger, nullable=False),
        PrimaryKeyConstraint("entity", "key"),
    )


def definition_of(row: Mapping[Any, Any]) -> cf.FieldDefinition:
    return cf.FieldDefinition(
        entity=row["entity"],
        key=row["key"],
        label=row["label"],
        type=cf.FieldType(row["type"]),
        required=bool(row["required"]),
        options=tuple(row["options"] or ()),
        pii=bool(row["pii"]),
        version=row["version"],
    )


async def load_definitions(conn: AsyncConnection, table: Table, entity: str) -> list[cf.FieldDefinition]:
    """The definitions of one entity, to validate its records' `custom` values with."""
    rows = await conn.execute(select(table).where(table.c.entity == entity).order_by(table.c.key))
    return [definition_of(row) for row in rows.mappings()]


def definition_to_proto(row: Mapping[Any, Any]) -> pb.CustomFieldDefinition:
    return pb.CustomFieldDefinition(
        entity=row["entity"],
        key=row["key"],
        label=row["label"],
        type=row["type"],
        required=bool(row["required"]),
        options=list(row["options"] or ()),
        pii=bool(row["pii"]),
        created_at=to_timestamp(row["created_at"]),
        version=row["version"],
    )


class CustomFieldServicer(CustomFieldServiceServicer):
    """The definitions of `entities` in `table`. Runs under the service's CallInterceptor like its
    other servicers, which sets the caller's principal and maps the domain errors raised here; who
    may change definitions is decided by the gateway's policy (resource `custom_fields`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        table: Table,
        *,
        keys: Table,
        entities: tuple[str, ...],
        clock: Callable[[], datetime] = utcnow,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.table = table
        self.keys = keys  # the service's idempotency keys (`idempotency.idempotency_table`)
        self.entities = entities
        self.clock = clock
        # Called after a committed change, e.g. to drop a per-replica cache of the definitions.
        self.on_change = on_change

    def _check_owned(self, entity: str) -> list[FieldError]:
        if entity in self.entities:
            return []
        owned = ", ".join(self.entities)
        if entity in cf.ENTITIES:
            return [FieldError("entity", f"{entity} custom fields are owned by another service (here: {owned})")]
        return [FieldError("entity", f"must be one of {owned}")]

    async def UpsertCustomField(
        self, request: pb.UpsertCustomFieldRequest, context: Any
    ) -> pb.UpsertCustomFieldResponse:
        d = request.definition
        errors = cf.check_definition(d.entity, d.key, d.label, d.type, d.options)
        if d.entity in cf.ENTITIES:  # check_definition already names an entity that does not exist
            errors += self._check_owned(d.entity)
        if errors:
            raise ValidationFailed(errors)
        t = self.table
        where = (t.c.entity == d.entity, t.c.key == d.key)
        name = f"{d.entity}.{d.key}"
        values = {
            "label": d.label.strip(),
            "type": d.type,
            "required": d.required,
            "options": list(d.options),
            "pii": d.pii,
        }
        async with transaction(self.engine) as conn:
            earlier = await idempotency.claim(
                conn, self.keys, operation="upsert_custom_field", caller=current_principal().user_id,
                key=request.idempotency_key, result=name, now=self.clock(),
            )  # fmt: skip
            if earlier is not None:
                first = (await conn.execute(select(t).where(*where))).mappings().first()
                if first is None:  # deleted since
                    raise NotFound(RESOURCE, name)
                return pb.UpsertCustomFieldResponse(definition=definition_to_proto(first))
            current = (await conn.execute(select(t).where(*where).with_for_update())).mappings().first()
            if current is None:
                if request.expected_version:
                    raise NotFound(RESOURCE, name)
                created = {"entity": d.entity, "key": d.key, "created_at": self.clock(), "version": 1, **values}
                if not await insert_ignore(conn, t, created, keys=["entity", "key"]):
                    # A concurrent writer created it since the read: lock theirs and update (or refuse) it below.
                    current = (await conn.execute(select(t).where(*where).with_for_update())).mappings().one()
            if current is not None:
                if request.create_only:
                    raise AlreadyExists(f"{RESOURCE} {name} already exists", existing_id=name)
                if request.expected_version and current["version"] != request.expected_version:
                    raise StaleVersion(RESOURCE, name, current["version"])
                await conn.execute(update(t).where(*where).values(version=current["version"] + 1, **values))
            row = (await conn.execute(select(t).where(*where))).mappings().one()
        self._changed()
        return pb.UpsertCustomFieldResponse(definition=definition_to_proto(row))

    async def ListCustomFields(self, request: pb.ListCustomFieldsRequest, context: Any) -> pb.ListCustomFieldsResponse:
        errors = self._check_owned(request.entity)
        if errors:
            raise ValidationFailed(errors)
        t = self.table
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(t).where(t.c.entity == request.entity).order_by(t.c.key))
            return pb.ListCustomFieldsResponse(items=[definition_to_proto(row) for row in rows.mappings()])

    async def DeleteCustomField(
        self, request: pb.DeleteCustomFieldRequest, context: Any
    ) -> pb.DeleteCustomFieldResponse:
        errors = self._check_owned(request.entity)
        if errors:
            raise ValidationFailed(errors)
        name = f"{request.entity}.{request.key}"
        if not cf.KEY_PATTERN.fullmatch(request.key):  # never stored; and PostgreSQL would refuse a NUL in it
            raise NotFound(RESOURCE, name)
        t = self.table
        where = (t.c.entity == request.entity, t.c.key == request.key)
        async with transaction(self.engine) as conn:
            current = (await conn.execute(select(t).where(*where).with_for_update())).mappings().first()
            if current is None:
                raise NotFound(RESOURCE, name)
            if request.expected_version and current["version"] != request.expected_version:
                raise StaleVersion(RESOURCE, name, current["version"])
            await conn.execute(delete(t).where(*where))
        self._changed()
        return pb.DeleteCustomFieldResponse(previous=definition_to_proto(current))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
