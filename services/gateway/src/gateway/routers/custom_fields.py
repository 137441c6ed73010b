"""Custom field definitions over REST (SPEC §5): `/custom-fields/{entity}` is served by the service
that owns the entity through crm.common.v1.CustomFieldService (every owner serves that one contract),
and the other routers read the entity's personal-data (pii) keys here to mask custom values."""

import time
from typing import Annotated, Any, Literal

from crm.common.v1 import custom_fields_pb2 as pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub
from crm_platform.timeutil import from_timestamp, isoformat
from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, Field

from gateway.security import Access, require
from gateway.upstreams import Upstreams

router = APIRouter(tags=["custom fields"])

EntityName = Literal["lead", "account", "contact", "opportunity", "ticket"]
# The upstream that owns, stores and validates the custom fields of each entity.
OWNERS: dict[str, str] = {
    "account": "accounts",
    "contact": "accounts",
    "lead": "leads",
    "opportunity": "sales",
    "ticket": "service_desk",
}
# Definitions change rarely: the pii keys are cached this long per entity. A change made through
# this replica drops its entry at once; other replicas see it within the TTL.
PII_TTL_SECONDS = 10.0
_pii_cache: dict[str, tuple[float, frozenset[str]]] = {}

IfMatch = Annotated[str | None, Header(alias="If-Match")]


class CustomFieldIn(BaseModel):
    key: str
    label: str
    type: str
    required: bool = False
    options: list[str] = Field(default_factory=list)
    pii: bool = False


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


def _expected_version(if_match: str | None) -> int:
    """`If-Match: "3"` → 3; absent → 0 (unconditional); malformed or beyond int64 → -1, which never
    matches (412, or 404 for a definition that does not exist)."""
    if not if_match:
        return 0
    text = if_match.strip().removeprefix("W/").strip('"')
    # isascii: str.isdigit() is also true for digits int() refuses, such as "²".
    return int(text) if text.isascii() and text.isdigit() and int(text) < 2**63 else -1


async def pii_keys(request: Request, access: Access, entity: str) -> frozenset[str]:
    """Keys of the entity's custom fields declared personal data (masked like phone and email)."""
    cached = _pii_cache.get(entity)
    if cached and time.monotonic() - cached[0] < PII_TTL_SECONDS:
        return cached[1]
    reply = await _stub(request, entity).ListCustomFields(
        pb.ListCustomFieldsRequest(entity=entity), metadata=access.grpc_metadata()
    )
    keys = frozenset(d.key for d in reply.items if d.pii)
    _pii_cache[entity] = (time.monotonic(), keys)
    return keys


@router.get("/custom-fields/{entity}", response_model=CustomFieldPage, response_model_exclude_unset=True)
async def list_custom_fields(
    entity: EntityName, request: Request, access: Annotated[Access, Depends(require("custom_fields", "read"))]
) -> Any:
    reply = await _stub(request, entity).ListCustomFields(
        pb.ListCustomFieldsRequest(entity=entity), metadata=access.grpc_metadata()
    )
    return {"items": access.present_many(definition_dict(d) for d in reply.items), "next_cursor": None}


async def _upsert(entity: str, key: str, body: CustomFieldIn, request: Request, access: Access, version: int) -> Any:
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
        pb.UpsertCustomFieldRequest(definition=definition, expected_version=version),
        metadata=access.grpc_metadata(),
    )
    _pii_cache.pop(entity, None)  # the pii flag may have changed
    record = definition_dict(reply.definition)
    await access.audit_write(f"{entity}.{key}", None, record, action="upsert")
    return access.present(record)


@router.post(
    "/custom-fields/{entity}", status_code=201, response_model=CustomFieldOut, response_model_exclude_unset=True
)
async def create_custom_field(
    entity: EntityName,
    body: CustomFieldIn,
    request: Request,
    access: Annotated[Access, Depends(require("custom_fields", "create"))],
) -> Any:
    return await _upsert(entity, body.key, body, request, access, 0)


@router.put("/custom-fields/{entity}/{key}", response_model=CustomFieldOut, response_model_exclude_unset=True)
async def update_custom_field(
    entity: EntityName,
    key: str,
    body: CustomFieldIn,
    request: Request,
    access: Annotated[Access, Depends(require("custom_fields", "update"))],
    if_match: IfMatch = None,
) -> Any:
    return await _upsert(entity, key, body, request, access, _expected_version(if_match))


@router.delete("/custom-fields/{entity}/{key}", status_code=204)
async def delete_custom_field(
    entity: EntityName,
    key: str,
    request: Request,
    access: Annotated[Access, Depends(require("custom_fields", "delete"))],
) -> Response:
    await _stub(request, entity).DeleteCustomField(
        pb.DeleteCustomFieldRequest(entity=entity, key=key), metadata=access.grpc_metadata()
    )
    _pii_cache.pop(entity, None)
    await access.audit_write(f"{entity}.{key}", {"key": key}, None)
    return Response(status_code=204)
