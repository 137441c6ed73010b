"""POST /leads:transfer: a departing rep's leads go to another rep (人走客户不走), permissioned as
POST /accounts:transfer is (the `assign` action: a manager may, a rep may not), a body the service
could not act on is a 422 naming the field, and the transfer is on the audit trail once for itself
and once on each lead it moved (a replay of its Idempotency-Key once, as a replay). The real
gateway app over a fake leads service."""

from typing import Any

import httpx
import pytest
from crm.leads.v1 import leads_service_pb2 as pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.idempotency import REPLAYED_METADATA
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from gateway.security.access import REPLAY_REASON
from gateway.testing import refuse

pytestmark = pytest.mark.integration

PATH = "/api/v1/leads:transfer"
BODY = {"from_owner_id": "u-leaver", "to_owner_id": "u-taker", "reason": "left the company"}
MOVED = "u-leaver -> u-taker: left the company"


class TransferringLeads(LeadsServiceServicer):
    """Moves lead-1 and lead-2 once per idempotency key, and leaves lead-3, whose conversion is under
    way; a repeat is answered as the service answers it (the first answer, marked replayed). Refuses
    the same owner twice, as the service does. Records each request with the record scope it came in."""

    def __init__(self) -> None:
        self.calls: list[tuple[pb.TransferLeadsRequest, RecordScope]] = []
        self.answers: dict[str, pb.TransferLeadsResponse] = {}

    async def TransferLeads(self, request: pb.TransferLeadsRequest, context: Any) -> pb.TransferLeadsResponse:
        self.calls.append((request, context_from_metadata(context.invocation_metadata()).scope))
        if request.from_owner_id == request.to_owner_id:
            await refuse(context, ValidationFailed([FieldError("to_owner_id", "must differ from from_owner_id")]))
        if request.idempotency_key in self.answers:
            context.set_trailing_metadata((REPLAYED_METADATA,))
            return self.answers[request.idempotency_key]
        answer = pb.TransferLeadsResponse(
            bulk_transfer_id="bt-1",
            leads_transferred=2,
            tasks_transferred=3,
            lead_ids=["lead-1", "lead-2"],
            skipped_lead_ids=["lead-3"],
        )
        if request.idempotency_key:
            self.answers[request.idempotency_key] = answer
        return answer


@pytest.fixture
def leads() -> TransferringLeads:
    return TransferringLeads()


@pytest.mark.parametrize(("role", "scope"), [("sales_manager", ScopeKind.TEAM), ("admin", ScopeKind.ALL)])
async def test_a_manager_transfers_a_reps_leads_in_their_scope(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: TransferringLeads, role: str, scope: ScopeKind
) -> None:
    body = {**BODY, "to_team": "west"}
    response = await leads_http.post(PATH, json=body, headers={**leads_auth(role), "Idempotency-Key": "leave-1"})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "bulk_transfer_id": "bt-1",
        "leads_transferred": 2,
        "tasks_transferred": 3,
        "skipped_lead_ids": ["lead-3"],  # left with the departing rep while its conversion runs
    }
    [(request, sent_scope)] = leads.calls
    assert (request.from_owner_id, request.to_owner_id, request.to_team) == ("u-leaver", "u-taker", "west")
    assert (request.reason, request.idempotency_key) == ("left the company", "leave-1")
    assert sent_scope.kind is scope


@pytest.mark.parametrize("role", ["sales_rep", "marketing", "analyst"])
async def test_a_caller_who_may_not_assign_leads_may_not_transfer_them(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads_trail: Any, leads: TransferringLeads, role: str
) -> None:
    response = await leads_http.post(PATH, json=BODY, headers=leads_auth(role))

    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert leads.calls == []
    assert await leads_trail() == [("denied", "denied", "", "assign: you may not assign leads")]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"to_owner_id": "u-taker"}, ["from_owner_id"]),
        ({"from_owner_id": "u-leaver"}, ["to_owner_id"]),
        ({**BODY, "from_owner_id": " ", "to_owner_id": "\t"}, ["from_owner_id", "to_owner_id"]),
        ({**BODY, "to_team": "  "}, ["to_team"]),
        ({**BODY, "to_owner_id": "u" * 201}, ["to_owner_id"]),
        ({**BODY, "dry_run": True}, ["dry_run"]),
    ],
)
async def test_a_body_naming_no_two_owners_is_422_naming_the_field_before_the_service_is_called(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: TransferringLeads, body: dict[str, Any], fields: list[str]
) -> None:
    response = await leads_http.post(PATH, json=body, headers=leads_auth("sales_manager"))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == fields
    assert leads.calls == []


async def test_a_transfer_to_the_departing_rep_is_the_services_422_naming_the_field(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads_trail: Any, leads: TransferringLeads
) -> None:
    response = await leads_http.post(
        PATH, json={**BODY, "to_owner_id": "u-leaver"}, headers=leads_auth("sales_manager")
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] == [{"field": "to_owner_id", "message": "must differ from from_owner_id"}]
    assert await leads_trail() == []  # nothing moved, nothing audited as done


async def test_a_transfer_is_on_the_trail_of_the_transfer_and_of_each_lead_it_moved(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads_trail: Any
) -> None:
    response = await leads_http.post(PATH, json=BODY, headers=leads_auth("sales_manager"))

    assert response.status_code == 200, response.text
    assert await leads_trail() == [
        ("bulk_transfer", "allowed", "bt-1", MOVED),
        ("transfer", "allowed", "lead-1", f"{MOVED} (bt-1)"),
        ("transfer", "allowed", "lead-2", f"{MOVED} (bt-1)"),
    ]


async def test_a_transfer_repeated_with_its_key_answers_the_same_and_is_audited_once_as_a_replay(
    leads_http: httpx.AsyncClient,
    leads_auth: Any,
    leads_trail: Any,
) -> None:
    keyed = {**leads_auth("sales_manager"), "Idempotency-Key": "leave-1"}
    first = await leads_http.post(PATH, json=BODY, headers=keyed)
    again = await leads_http.post(PATH, json=BODY, headers=keyed)

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json() == first.json()
    assert await leads_trail() == [
        ("bulk_transfer", "allowed", "bt-1", MOVED),
        ("replay", "allowed", "bt-1", f"bulk_transfer: {REPLAY_REASON}"),  # not lead by lead again
        ("transfer", "allowed", "lead-1", f"{MOVED} (bt-1)"),
        ("transfer", "allowed", "lead-2", f"{MOVED} (bt-1)"),
    ]
