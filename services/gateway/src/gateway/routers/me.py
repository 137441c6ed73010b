"""`GET /api/v1/me`: who the caller is and what the policy lets them do, per resource."""

from fastapi import Request
from pydantic import BaseModel

from gateway.inputs import reject_unknown_query_parameters
from gateway.routers.custom_fields import RESOURCE_ENTITIES, masked_custom_fields
from gateway.routing import ResourceRouter
from gateway.security import Access, CurrentPrincipal
from gateway.security.access import runtime_of

router = ResourceRouter(tags=["me"])


class ResourcePermissions(BaseModel):
    actions: list[str]
    # Record scope per allowed action: own, team, region or all.
    scopes: dict[str, str]
    # Effective rule per field: hidden, masked, read or write; `custom.<key>` for the custom fields
    # defined as personal data that the caller reads masked.
    fields: dict[str, str]


class Me(BaseModel):
    user_id: str
    name: str
    kind: str
    roles: list[str]
    team: str
    region: str
    permissions: dict[str, ResourcePermissions]


@router.get("/me", response_model=Me)
async def get_me(request: Request, principal: CurrentPrincipal) -> Me:
    # The check `require` makes for the routes of a resource: this one needs only the caller.
    reject_unknown_query_parameters(request)
    runtime = runtime_of(request)
    permissions = {name: ResourcePermissions(**rules) for name, rules in runtime.policy.effective(principal).items()}
    for name, permission in permissions.items():
        if name in RESOURCE_ENTITIES and "read" in permission.actions:
            decision = runtime.policy.decide(principal, name, "read")
            access = Access(runtime=runtime, request=request, principal=principal, decision=decision)
            permission.fields.update(dict.fromkeys(await masked_custom_fields(access), "masked"))
    return Me(
        user_id=principal.user_id,
        name=principal.name,
        kind=principal.kind,
        roles=list(principal.roles),
        team=principal.team,
        region=principal.region,
        permissions=permissions,
    )
