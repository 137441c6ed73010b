"""Roles x resources x actions x record positions, generated from the default policy and run
through the HTTP API: every cell must match the policy and no unauthorised request may get a 2xx."""

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from crm_platform.principal import Principal, ScopeKind
from gateway.security.policy import FieldRule, Grant, Policy, load_policy

pytestmark = pytest.mark.integration

ME, TEAM, REGION = "u-me", "team-a", "north"
# Where a record sits relative to the caller.
POSITIONS: dict[str, dict[str, str]] = {
    "own": {"owner_id": ME, "team": TEAM, "region": REGION},
    "same_team": {"owner_id": "u-colleague", "team": TEAM, "region": REGION},
    "same_region": {"owner_id": "u-neighbour", "team": "team-b", "region": REGION},
    "other": {"owner_id": "u-stranger", "team": "team-c", "region": "south"},
}
COVERS = {
    ScopeKind.OWN: {"own"},
    ScopeKind.TEAM: {"own", "same_team"},
    ScopeKind.REGION: {"own", "same_team", "same_region"},
    ScopeKind.ALL: set(POSITIONS),
}
RECORD_ACTIONS = ("read", "update", "delete", "assign", "approve")
SCOPE_ORDER = (ScopeKind.OWN, ScopeKind.TEAM, ScopeKind.REGION, ScopeKind.ALL)


def widest(grants: Sequence[Grant]) -> ScopeKind:
    return max((grant.scope for grant in grants), key=SCOPE_ORDER.index)


def expected(
    policy: Policy, roles: Sequence[str], resource: str, action: str, position: str | None, body: Sequence[str] = ()
) -> int:
    """The status the policy calls for: 403 when no role grants the action, 404 when the record is
    outside the widest scope of the grants that may do it and set every field of `body`."""
    grants = [grant for role in roles if (grant := policy.grant(role, resource)) and action in grant.actions]
    writers = [g for g in grants if all(policy.field_rule(g, resource, f) is FieldRule.WRITE for f in body)]
    if not writers:
        return 403
    if position is not None and position not in COVERS[widest(writers)]:
        return 404
    return {"create": 201, "delete": 204}.get(action, 200)


def visible(policy: Policy, roles: Sequence[str], resource: str, action: str) -> set[str]:
    """The record positions the caller may list or export."""
    grants = [grant for role in roles if (grant := policy.grant(role, resource)) and action in grant.actions]
    return COVERS[widest(grants)]


def writable_body(policy: Policy, roles: Sequence[str], resource: str, action: str) -> dict[str, Any]:
    """One field the roles may write (exercises check_write on the allowed path), else nothing."""
    decision = policy.decide(Principal(user_id=ME, roles=tuple(roles), team=TEAM, region=REGION), resource, action)
    if not decision.allowed:
        return {"name": "x"}
    for name, spec in policy.resource(resource).fields.items():
        if "." in name or name in ("owner_id", "team", "region") or (spec and spec.type not in ("text",)):
            continue
        if decision.write_rule(name).name == "WRITE":
            return {name: "changed"}
    return {}


POLICY = load_policy()
# Each role alone, and callers holding roles whose scopes and field rules differ.
ROLE_SETS = [(role,) for role in POLICY.roles] + [
    ("marketing", "sales_rep"),
    ("analyst", "sales_rep"),
    ("sales_rep", "service_agent"),
]
CELLS = [
    (role, resource, action)
    for role in POLICY.roles
    for resource, spec in POLICY.resources.items()
    for action in spec.actions
]


@pytest.mark.parametrize("roles", ROLE_SETS, ids="+".join)
async def test_matrix(roles: tuple[str, ...], make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(policy=POLICY)
    client = gateway.client
    headers = auth_headers(list(roles), sub=ME, team=TEAM, region=REGION)
    role = "+".join(roles)
    mismatches: list[str] = []
    unauthorised_2xx: list[str] = []
    tally: Counter[int] = Counter()

    def check(label: str, want: int, got: int) -> None:
        tally[got] += 1
        if got != want:
            mismatches.append(f"{label}: expected {want}, got {got}")
        if 200 <= got < 300 and want >= 400:
            unauthorised_2xx.append(label)

    for resource, spec in POLICY.resources.items():
        records = {
            position: gateway.store.put(resource, {"id": f"{resource}-{position}", "name": position, **where})
            for position, where in POSITIONS.items()
        }
        base = f"/api/v1/fake/{resource}"
        for action in spec.actions:
            if action == "create":
                body = writable_body(POLICY, roles, resource, action)
                response = await client.post(base, json=body, headers=headers)
                want = expected(POLICY, roles, resource, "create", None, list(body))
                check(f"{role} create {resource}", want, response.status_code)
            elif action == "export":
                response = await client.get(f"/api/v1/exports/{resource}?format=csv", headers=headers)
                want = expected(POLICY, roles, resource, "export", None)
                check(f"{role} export {resource}", want, response.status_code)
                if want == 200 and response.status_code == 200:
                    exported = visible(POLICY, roles, resource, "export")
                    rows = response.text.strip().splitlines()[1:]
                    # Every in-scope record (ours plus any the create cell added), nothing else.
                    ids = {gateway.store.records[resource][rid]["id"] for rid in gateway.store.records[resource]}
                    in_scope = {
                        rid
                        for rid in ids
                        if rid.rsplit("-", 1)[-1] in exported or rid not in {r["id"] for r in records.values()}
                    }
                    if len(rows) != len(in_scope):
                        mismatches.append(f"{role} export {resource}: {len(rows)} rows, {len(in_scope)} in scope")
            elif action == "read":
                listing = await client.get(base, headers=headers)
                want_list = expected(POLICY, roles, resource, "read", None)
                check(f"{role} list {resource}", want_list, listing.status_code)
                if listing.status_code == 200:
                    seen = {item.get("name") for item in listing.json()["items"]}
                    leaked = (seen & set(POSITIONS)) - visible(POLICY, roles, resource, "read")
                    if leaked:
                        mismatches.append(f"{role} list {resource}: out-of-scope records {sorted(leaked)}")
        for position, record in records.items():
            for action in RECORD_ACTIONS:
                if action not in spec.actions:
                    continue
                url = f"{base}/{record['id']}"
                body = writable_body(POLICY, roles, resource, action) if action == "update" else {}
                want = expected(POLICY, roles, resource, action, position, list(body))
                if action == "read":
                    response = await client.get(url, headers=headers)
                elif action == "update":
                    response = await client.patch(url, json=body, headers=headers)
                elif action == "delete":
                    response = await client.delete(url, headers=headers)
                else:
                    response = await client.post(f"{url}/{action}", json={}, headers=headers)
                check(f"{role} {action} {resource} [{position}]", want, response.status_code)
                if action == "delete" and response.status_code == 204:
                    gateway.store.put(resource, record)  # keep the record for later cells

    assert not unauthorised_2xx, f"unauthorised 2xx: {unauthorised_2xx}"
    assert not mismatches, "\n".join(mismatches)
    assert sum(tally.values()) > 50


def test_matrix_covers_every_cell_of_the_policy() -> None:
    """The generated matrix spans the whole policy: every role, resource and declared action."""
    assert len(POLICY.roles) == 9
    assert {resource for _, resource, _ in CELLS} == set(POLICY.resources)
    assert len(CELLS) == sum(len(spec.actions) for spec in POLICY.resources.values()) * len(POLICY.roles)
