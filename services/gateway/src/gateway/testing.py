"""Helpers for tests of the gateway (and of code that uses it): edits of the default policy, and
the real gateway started in process under such a policy."""

import copy
import functools
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn, get_args

import grpc
import httpx
import yaml
from crm.common.v1 import custom_fields_pb2
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer, add_CustomFieldServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.custom_fields_service import SERVICE_NAME, CustomFieldServicer, definitions_table
from crm_platform.db import create_engine
from crm_platform.errors import CrmError, NotFound
from crm_platform.grpc_errors import to_status
from crm_platform.grpc_server import GrpcServer
from crm_platform.idempotency import idempotency_table
from crm_platform.principal import context_from_metadata
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel
from sqlalchemy import MetaData

from gateway.app import create_app
from gateway.config import Settings
from gateway.security.policy import DEFAULT_POLICY_PATH

# A change to the default policy document before a gateway loads it.
PolicyEdit = Callable[[dict[str, Any]], None]
# `await role_client(role, *edits, upstream="host:port")` (the fixture of the gateway's security tests).
RoleClient = Callable[..., Awaitable[httpx.AsyncClient]]


# libyaml where present: the pure-Python YAML takes most of a second for the default policy.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@functools.cache
def _default_policy() -> dict[str, Any]:
    document: dict[str, Any] = yaml.load(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    return document


def default_policy_document() -> dict[str, Any]:
    """The default policy document, to edit (a copy of one read once per process)."""
    return copy.deepcopy(_default_policy())


def policy_text(document: dict[str, Any]) -> str:
    """A policy document as the YAML a gateway loads."""
    return yaml.dump(document, Dumper=_YAML_DUMPER)


def grant_fields(role: str, resource: str, **rules: str) -> PolicyEdit:
    """Field rules added to one grant of the default policy."""

    def edit(policy: dict[str, Any]) -> None:
        policy["roles"][role]["grants"][resource].setdefault("fields", {}).update(rules)

    return edit


@asynccontextmanager
async def started_gateway(
    folder: Path,
    migrated_database: Path,
    *,
    secret: str,
    edits: Sequence[PolicyEdit] = (),
    token: str = "",
    **targets: str,
) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app in process, under the default policy changed by `edits`, on a copy of
    a migrated SQLite database, calling the services named in `targets` (`leads="host:port"`; the
    others answer 503): an HTTP client of it, sending `token` as bearer when given."""
    settings = _settings(folder, migrated_database, secret, edits, targets)
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers, timeout=30
        ) as client:
            yield client
    finally:
        await app.state.upstreams.close()
        await app.state.security.stop()


def _settings(
    folder: Path, migrated_database: Path, secret: str, edits: Sequence[PolicyEdit], targets: dict[str, str]
) -> Settings:
    """The gateway's settings for `started_gateway`: its policy file and database copy, numbered so
    that one test may start several."""
    unknown = set(targets) - {"leads", "accounts", "sales", "service_desk", "analytics"}
    if unknown:
        raise TypeError(f"no such service to call: {sorted(unknown)}")
    number = len(list(folder.glob("gateway-*.db")))
    policy = default_policy_document()
    for edit in edits:
        edit(policy)
    policy_path = folder / f"policy-{number}.yaml"
    policy_path.write_text(policy_text(policy), encoding="utf-8")
    database = folder / f"gateway-{number}.db"
    shutil.copyfile(migrated_database, database)
    return Settings(
        dev_mode=True,
        dev_jwt_secret=secret,
        database_url=f"sqlite+aiosqlite:///{database}",
        policy_path=str(policy_path),
        audit_relay_enabled=False,
        audit_ingest_enabled=False,
        leads_target=targets.get("leads", ""),
        accounts_target=targets.get("accounts", ""),
        sales_target=targets.get("sales", ""),
        service_desk_target=targets.get("service_desk", ""),
        analytics_target=targets.get("analytics", ""),
    )


@asynccontextmanager
async def serving(*add_servicers: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """Fake services on a local gRPC port, for the gateway to call: their `host:port`.
    `serving(lambda server: add_LeadsServiceServicer_to_server(fake, server))`."""
    server = grpc.aio.server()
    for add in add_servicers:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def serving_lead_definitions(folder: Path, *, call_secret: str = "") -> AsyncIterator[str]:
    """The `host:port` of lead custom field definitions served as the leads service serves them (its
    servicer on a SQLite file in `folder`, behind the services' own gRPC server)."""
    metadata = MetaData()
    table = definitions_table(metadata, "custom_field_definitions")
    keys = idempotency_table(metadata)
    engine = create_engine(f"sqlite+aiosqlite:///{folder / 'definitions.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    servicer = CustomFieldServicer(engine, table, keys=keys, entities=("lead",))
    server = GrpcServer(
        service="leads",
        service_names=[SERVICE_NAME],
        register=lambda s: add_CustomFieldServiceServicer_to_server(servicer, s),
        call_secret=call_secret,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await engine.dispose()


async def refuse(context: grpc.aio.ServicerContext[Any, Any], error: CrmError) -> NoReturn:
    """Refuses a call to a fake service as the services do (`crm_platform.grpc_server`)."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort raises")


async def ticket_in_scope(
    context: grpc.aio.ServicerContext[Any, Any], tickets: Mapping[str, servicedesk_pb2.Ticket], ticket_id: str
) -> servicedesk_pb2.Ticket:
    """The ticket of a fake service desk as the service finds it: only in the record scope sent with
    the call (its owner is its assignee); else NOT_FOUND, as for a ticket that does not exist."""
    scope = context_from_metadata(context.invocation_metadata()).scope
    ticket = tickets.get(ticket_id)
    if ticket is None or not scope.allows(owner_id=ticket.assignee_id, team=ticket.team, region=ticket.region):
        await refuse(context, NotFound("ticket", ticket_id))
    return ticket


class NoCustomFields(CustomFieldServiceServicer):
    """A service's custom-field definitions when it has none (routes read them to mask, filter and
    audit custom values)."""

    async def ListCustomFields(self, request: custom_fields_pb2.ListCustomFieldsRequest, context: Any) -> Any:
        return custom_fields_pb2.ListCustomFieldsResponse()


def add_no_custom_fields(server: grpc.aio.Server) -> None:
    """`serving(..., add_no_custom_fields)`: a fake service that defines no custom fields."""
    add_CustomFieldServiceServicer_to_server(NoCustomFields(), server)  # type: ignore[abstract]  # the one call


# A value for each scalar type that is not its default, so that a field set to it is printed.
_SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_STRING: "x",
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_INT32: 3,
    FieldDescriptor.TYPE_INT64: 4,
    FieldDescriptor.TYPE_UINT32: 5,
    FieldDescriptor.TYPE_UINT64: 6,
    FieldDescriptor.TYPE_DOUBLE: 1.5,
    FieldDescriptor.TYPE_FLOAT: 2.5,
    FieldDescriptor.TYPE_BYTES: b"x",
}


def filled(message: Message) -> Message:
    """`message` with every field set to a value that is not its default (an enum to its last
    value), so that a printer of it prints every field: the input of the answer-schema tests."""
    for field in message.DESCRIPTOR.fields:
        kind = field.message_type.full_name if field.message_type is not None else ""
        if kind == "google.protobuf.Struct":
            getattr(message, field.name).update({"budget": "100k"})
        elif kind == "google.protobuf.Timestamp":
            getattr(message, field.name).seconds = 1_780_000_000
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            if value_field.message_type is not None:
                filled(target[_SCALARS[key_field.type]])
            else:
                target[_SCALARS[key_field.type]] = _SCALARS[value_field.type]
        elif field.message_type is not None:
            target = getattr(message, field.name)
            filled(target.add() if field.is_repeated else target)
        else:
            scalar = field.enum_type.values[-1].number if field.enum_type is not None else _SCALARS[field.type]
            if field.is_repeated:
                getattr(message, field.name).append(scalar)
            else:
                setattr(message, field.name, scalar)
    return message


def assert_documented(body: dict[str, Any], model: type[BaseModel]) -> None:
    """An answer as a route prints it has exactly the fields its OpenAPI schema documents, each of
    the documented JSON type, and so has every record inside it (validation alone would ignore a
    field a nested model does not document)."""
    documented = {info.alias or name for name, info in model.model_fields.items()}
    assert set(body) == documented, model.__name__
    model.model_validate(body, strict=True)
    for name, info in model.model_fields.items():
        inner = _record_model(info.annotation)
        value = body[info.alias or name]
        for item in value if isinstance(value, list) else [value]:
            if inner is not None and isinstance(item, dict):
                assert_documented(item, inner)


def _record_model(annotation: Any) -> type[BaseModel] | None:
    """The model of the records a field holds (`list[LineItem] | None`: LineItem), None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _record_model(arg)) is not None), None)
