"""PATCH and DELETE /leads/{lead_id}/activities/{activity_id} in the real gateway over a fake leads
service that applies the scopes it is sent as the real one does: the call's scope is the caller's on
activities (an activity is its actor's, in its lead's team and region), their scope on leads goes
beside it, as logging an activity checks the lead. Who may correct (reps their own, managers their
team's) and delete (managers, admins) is the policy's; out of scope is a 404; the body is typed as
when logging; If-Match reaches the service; every write is audited with the activity before and
after."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm_platform.errors import NotFound, StaleVersion
from crm_platform.principal import RecordScope, context_from_metadata, resource_scope_from_metadata
from crm_platform.timeutil import to_timestamp
from gateway.testing import refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "lead-activity-edits-secret-" + "a" * 30
TEAM, REGION = "east", "north"
# The lead rep-1 owns, in team east; a call rep-1 logged on it and a note their manager logged.
LEAD = leads_pb2.Lead(id="l-1", owner_id="rep-1", team=TEAM, region=REGION)
OCCURRED = to_timestamp(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


def stored_activities() -> dict[str, leads_pb2.LeadActivity]:
    return {
        "a-call": leads_pb2.LeadActivity(
            id="a-call", lead_id="l-1", kind="call", notes="tlak", actor_id="rep-1", occurred_at=OCCURRED, version=3
        ),
        "a-note": leads_pb2.LeadActivity(
            id="a-note", lead_id="l-1", kind="note", actor_id="mgr-1", occurred_at=OCCURRED, version=1
        ),
    }


def sees(activity: leads_pb2.LeadActivity, activities_scope: RecordScope, leads_scope: RecordScope | None) -> bool:
    """The lead in the scope on leads sent beside the call (none sent: a gateway that forgot it),
    the activity in the call's scope: its actor's, in its lead's team and region."""
    where = {"team": LEAD.team, "region": LEAD.region}
    lead_seen = leads_scope is not None and leads_scope.allows(owner_id=LEAD.owner_id, **where)
    return lead_seen and activities_scope.allows(owner_id=activity.actor_id, **where)


@dataclass
class FakeLeads(LeadsServiceServicer):
    """The lead's activities; each write noted with the scopes it came with (activities, leads)."""

    activities: dict[str, leads_pb2.LeadActivity] = field(default_factory=stored_activities)
    writes: list[tuple[Any, RecordScope, RecordScope | None]] = field(default_factory=list)

    async def _found(self, request: Any, context: Any) -> leads_pb2.LeadActivity:
        """The activity the request names, refused as the service refuses it (404, 412)."""
        metadata = context.invocation_metadata()
        activities_scope = context_from_metadata(metadata).scope
        leads_scope = resource_scope_from_metadata(metadata, "leads")
        self.writes.append((request, activities_scope, leads_scope))
        activity = self.activities.get(request.activity_id)
        if activity is None or activity.lead_id != request.lead_id or not sees(activity, activities_scope, leads_scope):
            await refuse(context, NotFound("activity", request.activity_id))
            raise AssertionError("aborted")
        if request.expected_version and request.expected_version != activity.version:
            await refuse(context, StaleVersion("activity", activity.id, activity.version))
        return activity

    async def UpdateLeadActivity(self, request: pb.UpdateLeadActivityRequest, context: Any) -> Any:
        before = await self._found(request, context)
        after = leads_pb2.LeadActivity()
        after.CopyFrom(before)
        request.update_mask.MergeMessage(request.activity, after)
        after.version += 1
        return pb.UpdateLeadActivityResponse(activity=after, previous=before)

    async def DeleteLeadActivity(self, request: pb.DeleteLeadActivityRequest, context: Any) -> Any:
        return pb.DeleteLeadActivityResponse(activity=await self._found(request, context))


@dataclass
class Stack:
    leads: FakeLeads
    http: httpx.AsyncClient

    @staticmethod
    def headers(role: str, sub: str, team: str = TEAM, **extra: str) -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team=team, region=REGION)
        return {"Authorization": f"Bearer {token}", **extra}

    async def audited(self) -> list[tuple[str, str, str, Any, Any]]:
        """(action, record, outcome, before, after) of the audit rows on activities, oldest first."""
        response = await self.http.get(
            "/api/v1/audit-events", params={"resource": "activities"}, headers=self.headers("admin", "auditor")
        )
        assert response.status_code == 200, response.text
        rows = reversed(response.json()["items"])
        return [(r["action"], r["record_id"], r["outcome"], r["before"], r["after"]) for r in rows]


@pytest.fixture
async def stack(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Stack]:
    leads = FakeLeads()
    async with (
        serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, leads=target) as http,
    ):
        yield Stack(leads, http)


CALL = "/api/v1/leads/l-1/activities/a-call"


async def test_a_rep_corrects_their_own_activity_at_its_etags_version_and_it_is_audited(stack: Stack) -> None:
    rep = stack.headers("sales_rep", "rep-1", **{"If-Match": '"3"'})

    corrected = await stack.http.patch(CALL, json={"notes": "talked about pricing", "kind": "meeting"}, headers=rep)

    assert corrected.status_code == 200, corrected.text
    assert corrected.headers["ETag"] == '"4"'
    body = corrected.json()
    assert (body["id"], body["kind"], body["version"]) == ("a-call", "meeting", 4)
    assert (body["notes"], body["occurred_at"]) == ("talked about pricing", "2026-03-02T09:00:00Z")
    [(request, activities_scope, leads_scope)] = stack.leads.writes
    assert (request.lead_id, request.activity_id, request.expected_version) == ("l-1", "a-call", 3)
    assert list(request.update_mask.paths) == ["kind", "notes"]
    # The rep's own activities, on the rep's own leads (their scope for updating leads).
    assert (activities_scope.kind, activities_scope.owner_id) == ("own", "rep-1")
    assert leads_scope is not None and (leads_scope.kind, leads_scope.owner_id) == ("own", "rep-1")
    [(action, record, outcome, before, after)] = await stack.audited()
    assert (action, record, outcome) == ("update", "a-call", "allowed")
    assert (before["notes"], before["kind"]) == ("tlak", "call")
    assert (after["notes"], after["kind"]) == ("talked about pricing", "meeting")


async def test_out_of_the_callers_scopes_an_activity_is_a_404(stack: Stack) -> None:
    rep = stack.headers("sales_rep", "rep-1")
    note = "/api/v1/leads/l-1/activities/a-note"
    misses = [
        await stack.http.patch(note, json={"notes": "x"}, headers=rep),  # the manager's, on the rep's lead
        await stack.http.patch(CALL, json={"notes": "x"}, headers=stack.headers("sales_rep", "rep-2")),
        await stack.http.patch("/api/v1/leads/l-2/activities/a-call", json={"notes": "x"}, headers=rep),
        await stack.http.delete(CALL, headers=stack.headers("sales_manager", "mgr-2", team="west")),
    ]
    assert [response.status_code for response in misses] == [404, 404, 404, 404]
    manager = stack.headers("sales_manager", "mgr-1")
    assert (await stack.http.patch(CALL, json={"outcome": "reached"}, headers=manager)).status_code == 200
    _, activities_scope, leads_scope = stack.leads.writes[-1]
    assert (activities_scope.kind, activities_scope.team) == ("team", TEAM)
    assert leads_scope is not None and (leads_scope.kind, leads_scope.team) == ("team", TEAM)


@pytest.mark.parametrize(
    ("role", "method", "status"),
    [
        ("sales_rep", "DELETE", 403),  # reps correct, managers delete
        ("sales_manager", "DELETE", 204),
        ("admin", "DELETE", 204),
        ("marketing", "PATCH", 403),  # no grant on activities
        ("service_agent", "PATCH", 403),  # logs activities, corrects none
        ("service_agent", "DELETE", 403),
    ],
)
async def test_who_may_correct_or_delete_an_activity_is_the_policys(
    stack: Stack, role: str, method: str, status: int
) -> None:
    headers = stack.headers(role, f"{role}-1")
    response = await stack.http.request(
        method, CALL, json={"notes": "x"} if method == "PATCH" else None, headers=headers
    )
    assert response.status_code == status, response.text
    assert len(stack.leads.writes) == (1 if status < 400 else 0)


async def test_a_delete_honours_if_match_and_is_audited_with_the_activity_as_it_was(stack: Stack) -> None:
    manager = stack.headers("sales_manager", "mgr-1")

    stale = await stack.http.delete(CALL, headers={**manager, "If-Match": '"2"'})
    deleted = await stack.http.delete(CALL, headers={**manager, "If-Match": '"3"'})

    assert stale.status_code == 412 and stale.json()["current_version"] == 3
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert [request.expected_version for request, _, _ in stack.leads.writes] == [2, 3]
    [(action, record, outcome, before, after)] = await stack.audited()
    assert (action, record, outcome, after) == ("delete", "a-call", "allowed", None)
    assert (before["kind"], before["notes"], before["version"]) == ("call", "tlak", 3)


@pytest.mark.parametrize(
    "body",
    [
        {},  # names nothing to correct
        {"kind": "fax"},
        {"notes": "x", "actor_id": "rep-2"},  # who logged it is not a correction
        {"version": 4},
        {"lead_id": "l-2"},  # an activity logged on the wrong lead is deleted and logged again
        {"occurred_at": "2026-03-02T09:00:00"},  # no time zone: no instant
        {"outcome": "x" * 201},
        {"notes": None},
    ],
)
async def test_a_correction_is_typed_as_logging_is(stack: Stack, body: dict[str, Any]) -> None:
    response = await stack.http.patch(CALL, json=body, headers=stack.headers("sales_rep", "rep-1"))
    assert response.status_code == 422, response.text
    assert stack.leads.writes == []


async def test_a_follow_up_is_cleared_by_null(stack: Stack) -> None:
    response = await stack.http.patch(
        CALL, json={"next_follow_up_at": None}, headers=stack.headers("sales_rep", "rep-1")
    )
    assert response.status_code == 200, response.text
    [(request, _, _)] = stack.leads.writes
    assert list(request.update_mask.paths) == ["next_follow_up_at"]
    assert not request.activity.HasField("next_follow_up_at")
