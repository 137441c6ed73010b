"""Admin management of API keys for machine clients (ERP integrations, webforms)."""

import hashlib
from datetime import datetime
from typing import Annotated

from crm_platform.grpc_client import note_replay
from crm_platform.principal import ScopeKind
from crm_platform.timeutil import as_utc, isoformat, utcnow
from fastapi import Depends, Path, Query, Response
from pydantic import BaseModel, Field, field_validator

from gateway.conventions import IdempotencyKey
from gateway.inputs import Instant, NonBlank, RequestBody
from gateway.routing import ResourceRouter
from gateway.security import Access, require
from gateway.security.api_keys import ApiKeyRecord, IdempotencyKeyReused
from gateway.security.problems import SecurityProblem, not_found
from gateway.security.replays import REUSED, key_refused

router = ResourceRouter(tags=["api-keys"])


class ApiKeyCreate(RequestBody):
    name: NonBlank = Field(max_length=200)
    principal_id: NonBlank = Field(max_length=64, description="the user id the key acts as (as user ids are stored)")
    # Role names are checked against the policy's roles.
    roles: list[Annotated[str, Field(max_length=100)]] = Field(min_length=1, max_length=20)
    team: str = Field(default="", max_length=200)
    region: str = Field(default="", max_length=200)
    expires_at: Instant | None = None

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and as_utc(value) <= utcnow():
            raise ValueError("must be in the future")
        return as_utc(value) if value is not None else None


class ApiKeyOut(BaseModel):
    """A key as its reader sees it: a field a policy hides is absent (a masked time or number, null)."""

    id: str | None = None
    name: str | None = None
    prefix: str | None = None
    principal_id: str | None = None
    roles: list[str] | None = None
    team: str | None = None
    region: str | None = None
    created_by: str | None = None
    created_at: str | None = None
    expires_at: str | None = None
    revoked_at: str | None = None


class ApiKeyCreated(BaseModel):
    key: str | None = Field(
        description="the key, shown this once (only its hash is stored); null in the answer to a request "
        "repeated under its Idempotency-Key, which answers with the key it created, not a second one"
    )
    api_key: ApiKeyOut


class ApiKeyPage(BaseModel):
    items: list[ApiKeyOut]
    next_cursor: str | None = None


def _out(record: ApiKeyRecord) -> ApiKeyOut:
    return ApiKeyOut(
        id=record.id,
        name=record.name,
        prefix=record.prefix,
        principal_id=record.principal_id,
        roles=list(record.roles),
        team=record.team,
        region=record.region,
        created_by=record.created_by,
        created_at=isoformat(record.created_at) or "",
        expires_at=isoformat(record.expires_at),
        revoked_at=isoformat(record.revoked_at),
    )


def _refuse_more_than_the_creator_holds(access: Access, body: "ApiKeyCreate") -> None:
    """A key acts with the roles it carries, as the principal it names, in the team and region it
    names (which decide what its record scopes cover). Whoever creates keys in scope `all` (an
    admin) makes them for anyone; one whom a policy lets create keys in a narrower scope makes them
    for themselves, with roles they hold, in their own team and region (left out, they are the
    creator's): no key holds more than its creator."""
    creator = access.principal
    if access.scope.kind is ScopeKind.ALL:
        return
    for name, given, own in (("team", body.team, creator.team), ("region", body.region, creator.region)):
        if given and given != own:
            raise SecurityProblem(
                403, "Forbidden", f"a key acts in its creator's {name} unless an admin makes it", field=name
            )
    body.team, body.region = creator.team, creator.region
    for position, role in enumerate(body.roles):
        if role not in creator.roles:
            raise SecurityProblem(
                403,
                "Forbidden",
                f"a key may carry only roles its creator holds, not {role!r}",
                field=f"roles[{position}]",
            )
    if body.principal_id != creator.user_id:
        raise SecurityProblem(
            403, "Forbidden", "a key acts as its creator unless an admin makes it", field="principal_id"
        )


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated)
async def create_api_key(
    body: ApiKeyCreate,
    access: Annotated[Access, Depends(require("api_keys", "create"))],
    idempotency_key: IdempotencyKey = "",
) -> ApiKeyCreated:
    access.check_write(body.model_dump(exclude_unset=True))
    known = access.runtime.policy.roles
    for position, role in enumerate(body.roles):
        if role not in known:
            raise SecurityProblem(
                422,
                "Unprocessable Content",
                f"unknown role {role!r}; known: {', '.join(known)}",
                field=f"roles[{position}]",
            )
    _refuse_more_than_the_creator_holds(access, body)
    digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    try:
        record, key = await access.runtime.api_keys.create(
            name=body.name,
            principal_id=body.principal_id,
            roles=body.roles,
            team=body.team,
            region=body.region,
            created_by=access.principal.user_id,
            expires_at=body.expires_at,
            idempotency_key=idempotency_key,
            request_digest=digest,
        )
    except IdempotencyKeyReused:
        raise key_refused(idempotency_key, REUSED) from None
    if key is None:
        note_replay()  # audited as a replay: no key was created again
    out = _out(record)
    await access.audit_write(record.id, None, out.model_dump())
    return ApiKeyCreated(key=key, api_key=out)


@router.get("/api-keys", response_model=ApiKeyPage, response_model_exclude_unset=True)
async def list_api_keys(
    access: Annotated[Access, Depends(require("api_keys", "read"))],
    limit: Annotated[int | None, Query(ge=1, le=500, description="items per page, 1 to 500; 50 when left out")] = None,
    cursor: Annotated[str, Query(max_length=200, description="the `next_cursor` of the page before")] = "",
) -> ApiKeyPage:
    """The keys in the caller's scope (below `all`: the keys they made, or of their team or region),
    revoked ones too, in the order they were created, one page at a time."""
    records, following = await access.runtime.api_keys.list(access.scope, limit=access.page_limit(limit), cursor=cursor)
    return ApiKeyPage(
        items=[ApiKeyOut.model_validate(access.present(_out(r).model_dump())) for r in records],
        next_cursor=following or None,
    )


@router.delete("/api-keys/{key_id}", status_code=204, response_class=Response)
async def revoke_api_key(
    key_id: Annotated[str, Path(max_length=36)], access: Annotated[Access, Depends(require("api_keys", "delete"))]
) -> Response:
    before = await access.runtime.api_keys.get(key_id)
    if before is None or not before.in_scope(access.scope):  # another's key answers as a missing one
        raise not_found(f"api key {key_id} not found")
    after = await access.runtime.api_keys.revoke(key_id)
    if before.revoked_at is None and after is not None:
        await access.audit_write(key_id, _out(before).model_dump(), _out(after).model_dump(), action="delete")
    return Response(status_code=204)
