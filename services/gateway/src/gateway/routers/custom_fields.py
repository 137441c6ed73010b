"""Custom field definitions over REST (SPEC §5): `/custom-fields/{entity}` is served by the service
that owns the entity through crm.common.v1.CustomFieldService (every owner serves that one contract).

Every read path presents records with `presenter(access)` — the field rules plus the masking of
custom values defined as personal data (pii) for callers who see personal data masked — and list
routes of every entity pass `?custom.<key>=` filters to the owning service with `custom_filters(access)`
(403 for a field the caller does not read in clear; `check_custom_filters` for saved filters); such a
route takes those query parameters with `openapi_extra=CUSTOM_FILTER_PARAMETERS`."""

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

import grpc
from crm.common.v1 import custom_fields_pb2 as pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub
from crm_platform.custom_fields import canonical_number
from crm_platform.timeutil import from_timestamp, isoformat
from fastapi import Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from gateway.conventions import IF_MATCH_HEADER, IdempotencyKey, expected_version, with_etag
from gateway.inputs import NonBlank, ReplacementBody, check_same_as_path, prefixed_query_parameters
from gateway.routing import ResourceRouter
from gateway.security import Access, require
from gateway.security.masking import mask_value
from gateway.security.policy import FieldRule
from gateway.security.problems import forbidden
from gateway.upstreams import UpstreamNotConfigured, Upstreams

router = ResourceRouter(tags=["custom fields"])

EntityName = Literal["lead", "account", "contact", "opportunity", "ticket"]
# The upstream that owns, stores and validates the custom fields of each entity.
OWNERS: dict[str, str] = {
    "account": "accounts",
    "contact": "accounts",
    "lead": "leads",
    "opportunity": "sales",
    "ticket": "service_desk",
}
# The policy resource whose records carry the custom fields of each entity.
RESOURCE_ENTITIES: dict[str, str] = {
    "leads": "lead",
    "accounts": "account",
    "contacts": "contact",
    "opportunities": "opportunity",
    "tickets": "ticket",
}
# Definitions change rarely: the pii keys are cached this long per entity (per app). A change made
# through this replica drops its entry at once; other replicas see it within the TTL.
PII_TTL_SECONDS = 10.0

IfMatch = Annotated[str | None, IF_MATCH_HEADER]


class CustomFieldBody(ReplacementBody):
    read_only = frozenset({"entity", "created_at", "version"})
    # As the owning services store a definition (crm_platform.custom_fields_service).
    label: NonBlank = Field(max_length=200)
    type: NonBlank = Field(max_length=20)
    required: bool = False
    options: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list)
    pii: bool = False


class CustomFieldIn(CustomFieldBody):
    key: NonBlank = Field(max_length=63)


class CustomFieldReplace(CustomFieldBody):
    """PUT /custom-fields/{entity}/{key}: the path names the key; the body may repeat it."""

    key: NonBlank | None = Field(default=None, max_length=63)


class CustomFieldOut(BaseModel):
    entity: str
    key: str
    label: str | None = None
    type: str | None = None
    required: bool | None = None
    options: list[str] | None = None
    pii: bool | None = None
    created_at: str | None = None
    version: int | None = None


class CustomFieldPage(BaseModel):
    items: list[CustomFieldOut]
    next_cursor: str | None


def _stub(request: Request, entity: str) -> CustomFieldServiceStub:
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams.stub(OWNERS[entity], CustomFieldServiceStub)


def definition_dict(d: pb.CustomFieldDefinition) -> dict[str, Any]:
    return {
        "entity": d.entity,
        "key": d.key,
        "label": d.label,
        "type": d.type,
        "required": d.required,
        "options": list(d.options),
        "pii": d.pii,
        "created_at": isoformat(from_timestamp(d.created_at)) if d.HasField("created_at") else None,
        "version": d.version,
    }


def _pii_cache(request: Request) -> dict[str, tuple[float, frozenset[str]]]:
    """The app's cached pii keys per entity: (when read, keys)."""
    state = request.app.state
    if not hasattr(state, "custom_field_pii_keys"):
        state.custom_field_pii_keys = {}
    cache: dict[str, tuple[float, frozenset[str]]] = state.custom_field_pii_keys
    return cache


async def pii_keys(request: Request, access: Access, entity: str) -> frozenset[str]:
    """Keys of the entity's custom fields declared personal data (masked like phone and email)."""
    cache = _pii_cache(request)
    cached = cache.get(entity)
    if cached and time.monotonic() - cached[0] < PII_TTL_SECONDS:
        return cached[1]
    reply = await _stub(request, entity).ListCustomFields(
        pb.ListCustomFieldsRequest(entity=entity), metadata=access.grpc_metadata()
    )
    keys = frozenset(d.key for d in reply.items if d.pii)
    cache[entity] = (time.monotonic(), keys)
    return keys


Presenter = Callable[[Mapping[str, Any]], dict[str, Any]]


async def _masked_keys(access: Access) -> frozenset[str]:
    """The custom keys this caller sees masked: the pii ones, for a caller who sees personal data of
    the resource masked (`Access.masks_personal_data`); none for resources without custom fields."""
    entity = RESOURCE_ENTITIES.get(access.resource)
    if entity is None or not access.masks_personal_data():
        return frozenset()
    return await pii_keys(access.request, access, entity)


async def masked_custom_fields(access: Access) -> list[str]:
    """`custom.<key>` of each custom field the caller reads masked on the access's resource (`GET
    /me`); none when the owning service cannot say now (the values are masked all the same)."""
    try:
        keys = await _masked_keys(access)
    except (grpc.aio.AioRpcError, UpstreamNotConfigured):
        return []
    return [f"custom.{key}" for key in sorted(keys)]


def _stored_form(value: Any) -> Any:
    """A custom value as the owning service stores it: a number came as a Struct's double
    (`1000.0`), stored as an int when integral (`crm_platform.custom_fields.canonical_number`)."""
    return canonical_number(value) if isinstance(value, float) else value


async def presenter(access: Access) -> Presenter:
    """`access.present` for records of the caller's resource, with their custom values as stored
    (integral numbers as ints) and those defined as pii masked like phone and email for callers who
    see personal data masked. Every read of a record with custom fields goes through it: gets,
    lists, write responses, exports, composed views."""
    masked = await _masked_keys(access)

    def present(record: Mapping[str, Any]) -> dict[str, Any]:
        custom = record.get("custom")
        if isinstance(custom, Mapping):
            shown = {k: mask_value(v, "text") if k in masked else _stored_form(v) for k, v in custom.items()}
            record = {**record, "custom": shown}
        return access.present(record)

    return present


async def audit_pii_keys(access: Access) -> frozenset[str] | None:
    """The keys whose custom values the audit trail masks for the access's resource (custom fields
    defined as pii); None when the owning service cannot say (every custom value is then masked)."""
    entity = RESOURCE_ENTITIES.get(access.resource)
    if entity is None:
        return frozenset()
    try:
        return await pii_keys(access.request, access, entity)
    except (grpc.aio.AioRpcError, UpstreamNotConfigured):
        return None


async def check_custom_filters(access: Access, keys: Iterable[str]) -> None:
    """403 naming `custom.<key>` when filtering by a custom field the caller does not read in clear,
    like filtering by a masked email (it would reveal the value): a field hidden or masked by the
    field rules, or one defined as pii for a caller who sees personal data masked."""
    keys = list(keys)
    if not keys:
        return
    access.check_filter(f"custom.{key}" for key in keys)
    masked = await _masked_keys(access)
    for key in keys:
        if key in masked:
            raise forbidden(f"you may not filter by field 'custom.{key}' of {access.resource}", field=f"custom.{key}")


async def readable_custom_keys(access: Access, keys: Iterable[str]) -> frozenset[str]:
    """The keys among `keys` whose custom field the caller reads in clear (`check_custom_filters`
    passes for them): the others' filter values are masked where a saved filter is shown."""
    keys = list(keys)
    masked = await _masked_keys(access) if keys else frozenset()
    return frozenset(
        key for key in keys if key not in masked and access.decision.read_rule(f"custom.{key}") >= FieldRule.READ
    )


# The `openapi_extra` of a list route that reads `custom_filters(access)`: it takes every `custom.<key>`.
CUSTOM_FILTER_PARAMETERS = prefixed_query_parameters(
    "custom.",
    "Filters by custom fields: `custom.<key>=value`, all of which must match. 422 naming `custom.<key>` "
    "for a key without a definition or a value not of the field's type.",
)


async def custom_filters(access: Access) -> list[pb.CustomFieldFilter]:
    """The request's `?custom.<key>=value` filters for the owning service's list request, checked
    with `check_custom_filters` (403 naming `custom.<key>`). The service answers 422 naming
    `custom.<key>` for a key without a definition or a value not of the field's type."""
    filters = [
        pb.CustomFieldFilter(key=name.removeprefix("custom."), value=value)
        for name, value in access.request.query_params.multi_items()
        if name.startswith("custom.")
    ]
    await check_custom_filters(access, (f.key for f in filters))
    return filters


@router.get("/custom-fields/{entity}", response_model=CustomFieldPage, response_model_exclude_unset=True)
async def list_custom_fields(
    entity: EntityName, request: Request, access: Annotated[Access, Depends(require("custom_fields", "read"))]
) -> Any:
    reply = await _stub(request, entity).ListCustomFields(
        pb.ListCustomFieldsRequest(entity=entity), metadata=access.grpc_metadata()
    )
    return {"items": access.present_many(definition_dict(d) for d in reply.items), "next_cursor": None}


async def _upsert(
    entity: str,
    key: str,
    body: CustomFieldBody,
    request: Request,
    response: Response,
    access: Access,
    *,
    version: int = 0,
    create_only: bool = False,
    idempotency_key: str = "",
) -> Any:
    definition = pb.CustomFieldDefinition(
        entity=entity,
        key=key,
        label=body.label,
        type=body.type,
        required=body.required,
        options=body.options,
        pii=body.pii,
    )
    reply = await _stub(request, entity).UpsertCustomField(
        pb.UpsertCustomFieldRequest(
            definition=definition,
            expected_version=version,
            create_only=create_only,
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    _pii_cache(request).pop(entity, None)  # the pii flag may have changed
    record = definition_dict(reply.definition)
    await access.audit_write(f"{entity}.{key}", None, record, action="upsert")
    return with_etag(response, access.present(record))


@router.post(
    "/custom-fields/{entity}", status_code=201, response_model=CustomFieldOut, response_model_exclude_unset=True
)
async def create_custom_field(
    entity: EntityName,
    body: CustomFieldIn,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("custom_fields", "create"))],
    idempotency_key: IdempotencyKey = "",
) -> Any:
    """Creates the definition; 409 (reason DUPLICATE) when the key has one already: PUT replaces a
    definition, with If-Match, since the values stored under it were checked against it. A repeat
    under the first request's Idempotency-Key answers 201 with the definition it made."""
    return await _upsert(
        entity, body.key, body, request, response, access, create_only=True, idempotency_key=idempotency_key or ""
    )


@router.put("/custom-fields/{entity}/{key}", response_model=CustomFieldOut, response_model_exclude_unset=True)
async def update_custom_field(
    entity: EntityName,
    key: str,
    body: CustomFieldReplace,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("custom_fields", "update"))],
    if_match: IfMatch = None,
) -> Any:
    """Creates or replaces the definition; with `If-Match: "<version>"` only that version of an
    existing one (404 when there is none), with `If-Match: *` any version of an existing one."""
    check_same_as_path("key", body.key, key)
    version = expected_version(if_match)
    if if_match is not None and if_match.strip() == "*":
        await _require_definition(request, access, entity, key)
    return await _upsert(entity, key, body, request, response, access, version=version)


async def _require_definition(request: Request, access: Access, entity: str, key: str) -> None:
    """412 when the entity has no definition `key`: `If-Match: *` asks for a current one, and the
    service's upsert would create it. (One deleted between this read and the write is created again,
    as a PUT without If-Match would.)"""
    reply = await _stub(request, entity).ListCustomFields(
        pb.ListCustomFieldsRequest(entity=entity), metadata=access.grpc_metadata()
    )
    if all(definition.key != key for definition in reply.items):
        raise HTTPException(412, f"custom field {entity}.{key} does not exist (If-Match: *)")


@router.delete("/custom-fields/{entity}/{key}", status_code=204)
async def delete_custom_field(
    entity: EntityName,
    key: str,
    request: Request,
    access: Annotated[Access, Depends(require("custom_fields", "delete"))],
    if_match: IfMatch = None,
) -> Response:
    reply = await _stub(request, entity).DeleteCustomField(
        pb.DeleteCustomFieldRequest(entity=entity, key=key, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    _pii_cache(request).pop(entity, None)
    await access.audit_write(f"{entity}.{key}", definition_dict(reply.previous), None)
    return Response(status_code=204)
