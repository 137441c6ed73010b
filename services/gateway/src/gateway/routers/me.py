"""`GET /api/v1/me`: who the caller is and what the policy lets them do, per resource."""

from fastapi import Request
from pydantic import BaseModel

from gateway.inputs import reject_unknown_query_parameters
from gateway.routing import ResourceRouter
from gateway.security import CurrentPrincipal
from gateway.security.access import runtime_of

router = ResourceRouter(tags=["me"])


class ResourcePermissions(BaseModel):
    actions: list[str]
    # Record scope per allowed action: own, team, region or all.
    scopes: dict[str, str]
    # Effective rule per field: hidden, masked, read or write.
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
    policy = runtime_of(request).policy
    return Me(
        user_id=principal.user_id,
        name=principal.name,
        kind=principal.kind,
        roles=list(principal.roles),
        team=principal.team,
        region=principal.region,
        permissions={name: ResourcePermissions(**rules) for name, rules in policy.effective(principal).items()},
    )
