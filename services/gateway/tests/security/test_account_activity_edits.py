"""PATCH and DELETE /accounts/{account_id}/activities/{activity_id}: who may correct or delete an
activity is the policy's `activities: update` / `delete` (a rep corrects, a manager also deletes, a
service agent does neither); the call runs in the caller's scope for activities, with their scope for
accounts sent along so the service checks the account as when logging (out of scope: 404); the
body is checked as a logged activity's; If-Match carries the version the ETag showed (stale: 412);
each write is audited with the activity before and after.

The real gateway app over a fake accounts service holding one activity."""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm_platform.errors import NotFound, StaleVersion
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata, resource_scope_from_metadata
from gateway.testing import refuse, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "activity-edits-secret-" + "a" * 30
PATH = "/api/v1/accounts/acc-1/activities/act-1"


def stored() -> accounts_pb2.Activity:
    return accounts_pb2.Activity(
        id="act-1", account_id="acc-1", kind="call", subject="intro", notes="", actor_id="rep-1", version=3
    )


@dataclass
class Received:
    request: pb.UpdateActivityRequest | pb.DeleteActivityRequest | pb.ListActivitiesRequest
    # The call's record scope (the caller's for activities) and the scope for accounts sent along.
    scope: RecordScope
    accounts_scope: RecordScope | None


@dataclass
class FakeAccounts(AccountsServiceServicer):
    """One activity, act-1 on acc-1 at version 3; anything else is out of the caller's scope."""

    received: list[Received] = field(default_factory=list)

    def _receive(self, request: Any, context: Any) -> None:
        metadata = context.invocation_metadata()
        scope = context_from_metadata(metadata).scope
        self.received.append(Received(request, scope, resource_scope_from_metadata(metadata, "accounts")))

    async def _check(self, request: Any, context: Any) -> None:
        if (request.account_id, request.activity_id) != ("acc-1", "act-1"):
            await refuse(context, NotFound("activity", request.activity_id))
        if request.expected_version not in (0, 3):
            await refuse(context, StaleVersion("activity", "act-1", 3))

    async def LogActivity(self, request: pb.LogActivityRequest, context: Any) -> pb.LogActivityResponse:
        activity = accounts_pb2.Activity(
            id="act-new", account_id=request.account_id, kind=request.kind, outcome=request.outcome, version=1
        )
        activity.next_follow_up_at.CopyFrom(request.next_follow_up_at)
        return pb.LogActivityResponse(activity=activity)

    async def UpdateActivity(self, request: pb.UpdateActivityRequest, context: Any) -> pb.UpdateActivityResponse:
        self._receive(request, context)
        await self._check(request, context)
        activity = stored()
        request.update_mask.MergeMessage(request.activity, activity)
        activity.version = 4
        return pb.UpdateActivityResponse(activity=activity, previous=stored())

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Any) -> pb.ListActivitiesResponse:
        self._receive(request, context)
        return pb.ListActivitiesResponse(items=[stored()])

    async def DeleteActivity(self, request: pb.DeleteActivityRequest, context: Any) -> pb.DeleteActivityResponse:
        self._receive(request, context)
        await self._check(request, context)
        return pb.DeleteActivityResponse(activity=stored())


@dataclass
class Stack:
    accounts: FakeAccounts
    http: httpx.AsyncClient

    @staticmethod
    def headers(role: str, sub: str = "rep-1", **more: str) -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region="north")
        return {"Authorization": f"Bearer {token}", **more}

    async def audited(self) -> list[dict[str, Any]]:
        """The audit trail of act-1, oldest first, as an admin reads it."""
        response = await self.http.get(
            "/api/v1/audit-events", params={"record_id": "act-1"}, headers=self.headers("admin", sub="admin")
        )
        assert response.status_code == 200, response.text
        return list(reversed(response.json()["items"]))


PolicyEdit = Callable[[dict[str, Any]], None]


async def _stack(tmp_path: Path, migrated_sqlite: Path, edits: list[PolicyEdit]) -> AsyncIterator[Stack]:
    accounts = FakeAccounts()
    server = grpc.aio.server()
    add_AccountsServiceServicer_to_server(accounts, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gateway = started_gateway(tmp_path, migrated_sqlite, secret=SECRET, edits=edits, accounts=f"127.0.0.1:{port}")
    async with gateway as http:
        yield Stack(accounts, http)
    await server.stop(None)


@pytest.fixture
async def stack(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Stack]:
    async for made in _stack(tmp_path, migrated_sqlite, []):
        yield made


@pytest.fixture
async def notes_read_only_for_reps(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Stack]:
    def reps_read_notes(policy: dict[str, Any]) -> None:
        policy["roles"]["sales_rep"]["grants"]["activities"]["fields"]["notes"] = "read"

    async for made in _stack(tmp_path, migrated_sqlite, [reps_read_notes]):
        yield made


async def test_a_rep_corrects_an_activity_at_its_etags_version_audited_before_and_after(stack: Stack) -> None:
    body = {"notes": "met the CTO", "occurred_at": "2026-03-02T09:30:00+08:00"}
    patched = await stack.http.patch(PATH, json=body, headers=stack.headers("sales_rep", **{"If-Match": '"3"'}))

    assert patched.status_code == 200, patched.text
    assert patched.headers["ETag"] == '"4"'
    assert patched.json() == {
        "id": "act-1", "account_id": "acc-1", "contact_id": None, "kind": "call", "subject": "intro",
        "notes": "met the CTO", "actor_id": "rep-1", "occurred_at": "2026-03-02T01:30:00Z", "outcome": "",
        "next_follow_up_at": None, "version": 4,
    }  # fmt: skip
    [sent] = stack.accounts.received
    assert isinstance(sent.request, pb.UpdateActivityRequest)
    assert (sent.request.account_id, sent.request.activity_id, sent.request.expected_version) == ("acc-1", "act-1", 3)
    assert list(sent.request.update_mask.paths) == ["notes", "occurred_at"]
    assert sent.request.activity.occurred_at.seconds == 1772415000  # 2026-03-02T01:30:00Z
    # A rep's activities are their own; the account must be one of their own accounts, as when logging.
    assert (sent.scope.kind, sent.scope.owner_id) == (ScopeKind.OWN, "rep-1")
    assert sent.accounts_scope is not None
    assert (sent.accounts_scope.kind, sent.accounts_scope.owner_id) == (ScopeKind.OWN, "rep-1")

    [audited] = await stack.audited()
    assert (audited["action"], audited["resource"], audited["outcome"]) == ("update", "activities", "allowed")
    assert (audited["before"]["notes"], audited["after"]["notes"]) == ("", "met the CTO")
    assert {"notes", "occurred_at", "version"} <= set(audited["fields"])


async def test_a_manager_deletes_an_activity_of_the_team_audited_as_it_was(stack: Stack) -> None:
    deleted = await stack.http.delete(PATH, headers=stack.headers("sales_manager", sub="mgr", **{"If-Match": '"3"'}))

    assert (deleted.status_code, deleted.content) == (204, b"")
    [sent] = stack.accounts.received
    assert isinstance(sent.request, pb.DeleteActivityRequest)
    assert (sent.request.activity_id, sent.request.expected_version) == ("act-1", 3)
    assert (sent.scope.kind, sent.scope.team) == (ScopeKind.TEAM, "east")
    assert sent.accounts_scope is not None
    assert (sent.accounts_scope.kind, sent.accounts_scope.team) == (ScopeKind.TEAM, "east")
    [audited] = await stack.audited()
    assert (audited["action"], audited["after"]) == ("delete", None)
    assert (audited["before"]["subject"], audited["before"]["version"]) == ("intro", 3)


async def test_who_may_correct_or_delete_an_activity_is_the_policys_choice(stack: Stack) -> None:
    cases = [
        ("sales_rep", "DELETE", 403),  # a rep corrects what they logged, never deletes it
        ("service_agent", "PATCH", 403),  # an agent logs visits, and corrects none
        ("service_agent", "DELETE", 403),
        ("analyst", "PATCH", 403),
        ("admin", "PATCH", 200),
        ("admin", "DELETE", 204),
        ("sales_manager", "PATCH", 200),
    ]
    for role, method, status in cases:
        response = await stack.http.request(
            method, PATH, json={"subject": "x"} if method == "PATCH" else None, headers=stack.headers(role)
        )
        assert response.status_code == status, (role, method, response.text)
    # Only the allowed writes reached the service; the activity's trail has them and the refusals.
    assert [type(r.request).__name__ for r in stack.accounts.received] == [
        "UpdateActivityRequest", "DeleteActivityRequest", "UpdateActivityRequest",
    ]  # fmt: skip
    trail = await stack.audited()
    assert [row["action"] for row in trail if row["outcome"] == "allowed"] == ["update", "delete", "update"]
    assert [row["status_code"] for row in trail if row["outcome"] == "denied"] == [403] * 4


async def test_an_activity_out_of_scope_or_under_another_account_is_a_404(stack: Stack) -> None:
    rep = stack.headers("sales_rep")
    for path in ("/api/v1/accounts/acc-1/activities/act-9", "/api/v1/accounts/acc-2/activities/act-1"):
        assert (await stack.http.patch(path, json={"notes": "x"}, headers=rep)).status_code == 404
        manager = stack.headers("sales_manager", sub="mgr")
        assert (await stack.http.delete(path, headers=manager)).status_code == 404
    # Audited as refusals (act-1 under the wrong account), nothing written.
    assert [(row["outcome"], row["method"], row["status_code"]) for row in await stack.audited()] == [
        ("denied", "PATCH", 404),
        ("denied", "DELETE", 404),
    ]


async def test_a_stale_if_match_is_a_412_naming_the_current_version(stack: Stack) -> None:
    stale = await stack.http.patch(PATH, json={"notes": "x"}, headers=stack.headers("sales_rep", **{"If-Match": '"2"'}))
    assert stale.status_code == 412 and stale.json()["current_version"] == 3
    manager = stack.headers("sales_manager", sub="mgr", **{"If-Match": '"2"'})
    assert (await stack.http.delete(PATH, headers=manager)).status_code == 412


async def test_a_correction_is_checked_as_a_logged_activity(stack: Stack) -> None:
    rep = stack.headers("sales_rep")
    refused = [
        ({"kind": " "}, "kind"),
        ({"kind": "c" * 21}, "kind"),
        ({"subject": "s" * 501}, "subject"),
        ({"notes": 5}, "notes"),
        ({"occurred_at": "2026-03-02T09:30:00"}, "occurred_at"),  # no time zone: no instant
        ({"actor_id": "rep-2"}, "actor_id"),  # who logged it stays
        ({"contact_id": "c-1"}, "contact_id"),
        ({"version": 4}, "version"),
    ]
    for body, name in refused:
        response = await stack.http.patch(PATH, json=body, headers=rep)
        assert response.status_code == 422, body
        assert [error["field"] for error in response.json()["errors"]] == [name], body
    assert stack.accounts.received == []


async def test_a_field_the_caller_may_not_write_is_a_403_naming_it(notes_read_only_for_reps: Stack) -> None:
    stack = notes_read_only_for_reps
    rep = stack.headers("sales_rep")
    refused = await stack.http.patch(PATH, json={"notes": "x", "subject": "y"}, headers=rep)
    assert refused.status_code == 403 and refused.json()["errors"][0]["field"] == "notes"
    assert stack.accounts.received == []
    allowed = await stack.http.patch(PATH, json={"subject": "y"}, headers=rep)
    assert allowed.status_code == 200 and allowed.json()["subject"] == "y"


async def test_a_logged_activity_carries_its_version_as_etag(stack: Stack) -> None:
    logged = await stack.http.post(
        "/api/v1/accounts/acc-1/activities", json={"kind": "call"}, headers=stack.headers("sales_rep")
    )
    assert logged.status_code == 201, logged.text
    assert (logged.headers["ETag"], logged.json()["version"]) == ('"1"', 1)


async def test_an_activity_says_what_came_of_it_and_when_to_follow_up(stack: Stack) -> None:
    body = {"kind": "call", "outcome": "wants a quote", "next_follow_up_at": "2026-03-06T09:00:00+08:00"}
    logged = await stack.http.post("/api/v1/accounts/acc-1/activities", json=body, headers=stack.headers("sales_rep"))

    assert logged.status_code == 201, logged.text
    assert (logged.json()["outcome"], logged.json()["next_follow_up_at"]) == ("wants a quote", "2026-03-06T01:00:00Z")


async def test_a_timeline_is_listed_on_an_account_the_caller_may_read(stack: Stack) -> None:
    """A timeline tells that its account exists: the caller's scope for accounts goes along for the
    service to check the account, their scope for activities picks the entries."""
    listed = await stack.http.get("/api/v1/accounts/acc-1/activities", headers=stack.headers("service_agent"))

    assert listed.status_code == 200, listed.text
    [received] = stack.accounts.received
    assert received.scope == RecordScope(ScopeKind.OWN, owner_id="rep-1", team="east", region="north")
    assert received.accounts_scope == RecordScope(ScopeKind.REGION, owner_id="rep-1", team="east", region="north")
