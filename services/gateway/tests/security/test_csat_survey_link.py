"""A ticket's CSAT survey link at the real gateway (修完还能当场扫码让客户打分), against a fake
service desk that answers as the service does: the customer reads the survey and answers it without
a login, the key authenticating them; the answer is audited with the survey as its actor, never the
key (not even in the path); an unknown key is a failed authentication, audited and slowed down like
failed logins; the body is checked before the service hears of it; the ticket's `survey_key` is
shown only to who may enter CSAT answers, and kept out of the audit trail; CSAT answers show their
`channel`."""

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.servicedesk.v1 import servicedesk_pb2 as sd
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import AlreadyExists, Conflict, NotFound
from crm_platform.idempotency import REPLAYED_METADATA
from crm_platform.principal import context_from_metadata
from fastapi import FastAPI
from gateway.app import create_app, untraced
from gateway.config import Settings
from gateway.security.audit import AuditQuery
from gateway.testing import add_no_custom_fields, refuse, serving, ticket_in_scope
from gateway.token_cli import issue_dev_token
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration

SECRET = "csat-survey-link-secret-" + "q" * 30
KEY = "Sv3yK3y-0123456789abcdefghijklmn"  # as secrets.token_urlsafe(24) draws them
EXPIRED_KEY = "Expired-0123456789abcdefghijklmn"
BROKEN_KEY = "Broken00-0123456789abcdefghijklm"  # the service fails on it (INTERNAL)
SURVEY_PATH = "/api/v1/csat-surveys/{survey_key}"
RESOLVED = Timestamp(seconds=1_796_000_000)
EXPIRES = Timestamp(seconds=1_796_000_000 + 30 * 86_400)
TICKET = sd.Ticket(
    id="t-1", subject="Printer jams", status="resolved", assignee_id="u-1", team="east", region="north",
    account_id="acme", survey_key=KEY, resolved_at=RESOLVED, version=3,
)  # fmt: skip
STAFF_ANSWER = sd.CsatResponse(id="c-0", ticket_id="t-9", account_id="acme", score=3, channel="staff")


class FakeServiceDesk(ServiceDeskServiceServicer):
    """One resolved ticket (t-1, agent u-1's), whose survey link has KEY, and one whose link has
    expired; answers once per survey, repeating an earlier answer under its Idempotency-Key."""

    def __init__(self) -> None:
        self.answers: dict[str, sd.CsatResponse] = {}  # by idempotency key ("" too)
        self.survey_callers: list[str] = []  # the principal kinds the survey calls came with
        self.survey_requests: list[Any] = []

    def _caller(self, context: Any) -> None:
        self.survey_callers.append(context_from_metadata(context.invocation_metadata()).principal.kind)

    async def GetCsatSurvey(self, request: desk_pb.GetCsatSurveyRequest, context: Any) -> Any:
        self._caller(context)
        if request.survey_key == BROKEN_KEY:
            await context.abort(grpc.StatusCode.INTERNAL, "the database went away")
        if request.survey_key != KEY:
            await refuse(context, NotFound("csat_survey", request.survey_key))
        survey = sd.CsatSurvey(
            ticket_id="t-1", subject="Printer jams", resolved_at=RESOLVED, expires_at=EXPIRES,
            answered=bool(self.answers), answerable=not self.answers,
        )  # fmt: skip
        return desk_pb.GetCsatSurveyResponse(survey=survey)

    async def SubmitCsatSurvey(self, request: desk_pb.SubmitCsatSurveyRequest, context: Any) -> Any:
        self._caller(context)
        self.survey_requests.append(request)
        if request.survey_key == EXPIRED_KEY:
            await refuse(context, Conflict("the survey took answers until ...", reason="SURVEY_EXPIRED"))
        if request.survey_key != KEY:
            await refuse(context, NotFound("csat_survey", request.survey_key))
        if request.idempotency_key and request.idempotency_key in self.answers:
            context.set_trailing_metadata((REPLAYED_METADATA,))
            return desk_pb.SubmitCsatSurveyResponse(response=self.answers[request.idempotency_key])
        if self.answers:
            await refuse(context, AlreadyExists("this survey was answered already"))
        answer = sd.CsatResponse(
            id="c-1", ticket_id="t-1", account_id="acme", score=request.score, comment=request.comment,
            channel="customer", submitted_at=RESOLVED,
        )  # fmt: skip
        self.answers[request.idempotency_key] = answer
        return desk_pb.SubmitCsatSurveyResponse(response=answer)

    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        ticket = await ticket_in_scope(context, {TICKET.id: TICKET}, request.ticket_id)
        answer = sd.CsatResponse(id="c-1", ticket_id="t-1", score=5, channel="customer")
        return desk_pb.GetTicketResponse(ticket=ticket, csat=answer)

    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> Any:
        return desk_pb.ListTicketsResponse(items=[TICKET])

    async def ChangeTicketStatus(self, request: desk_pb.ChangeTicketStatusRequest, context: Any) -> Any:
        """Resolves t-1 as the first resolution does: the ticket gets its survey key then."""
        ticket = await ticket_in_scope(context, {TICKET.id: TICKET}, request.ticket_id)
        working = sd.Ticket()
        working.CopyFrom(ticket)
        working.status, working.survey_key, working.version = "in_progress", "", ticket.version - 1
        working.ClearField("resolved_at")
        return desk_pb.ChangeTicketStatusResponse(ticket=ticket, previous=working)

    async def SubmitCsat(self, request: desk_pb.SubmitCsatRequest, context: Any) -> Any:
        return desk_pb.SubmitCsatResponse(response=STAFF_ANSWER)

    async def ListCsatResponses(self, request: desk_pb.ListCsatResponsesRequest, context: Any) -> Any:
        return desk_pb.ListCsatResponsesResponse(items=[STAFF_ANSWER])


class Gateway:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient, desk: FakeServiceDesk) -> None:
        self.app = app
        self.client = client
        self.desk = desk

    async def audit_rows(self) -> list[dict[str, Any]]:
        rows, _ = await self.app.state.security.audit.query(AuditQuery())
        return rows  # type: ignore[no-any-return]


def auth(role: str, sub: str = "u-1") -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Gateway]:
    desk = FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only
    async with serving(
        lambda server: add_ServiceDeskServiceServicer_to_server(desk, server), add_no_custom_fields
    ) as target:
        database = tmp_path / "gateway.db"
        shutil.copyfile(migrated_sqlite, database)
        settings = Settings(
            dev_mode=True,
            dev_jwt_secret=SECRET,
            database_url=f"sqlite+aiosqlite:///{database}",
            leads_target="",
            accounts_target="",
            sales_target="",
            service_desk_target=target,
            analytics_target="",
            audit_relay_enabled=False,
            audit_ingest_enabled=False,
            auth_failure_burst=3,
        )
        app = create_app(settings)
        await app.state.security.start(migrate=False, relay=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            yield Gateway(app, client, desk)
        await app.state.upstreams.close()
        await app.state.security.stop()


# --- the public survey ---------------------------------------------------------------------------


async def test_the_customer_reads_the_survey_without_a_login(gateway: Gateway) -> None:
    response = await gateway.client.get(f"/api/v1/csat-surveys/{KEY}")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "ticket_id": "t-1",
        "subject": "Printer jams",
        "resolved_at": "2026-11-30T00:53:20Z",
        "expires_at": "2026-12-30T00:53:20Z",
        "answered": False,
        "answerable": True,
    }
    assert gateway.desk.survey_callers == ["anonymous"]  # the key authenticates, no principal is sent
    assert await gateway.audit_rows() == []  # a survey read is no write


async def test_the_customer_answers_without_a_login_audited_as_the_survey_never_its_key(gateway: Gateway) -> None:
    response = await gateway.client.post(
        f"/api/v1/csat-surveys/{KEY}", json={"score": 4, "comment": "Fixed on the spot"}
    )

    assert response.status_code == 201, response.text
    assert response.json() == {"status": "received"}  # the answer echoes nothing
    [sent] = gateway.desk.survey_requests
    assert (sent.survey_key, sent.score, sent.comment) == (KEY, 4, "Fixed on the spot")
    assert gateway.desk.survey_callers == ["anonymous"]
    [row] = await gateway.audit_rows()
    assert row["actor"] == {"user_id": "survey:t-1", "kind": "customer", "roles": [], "team": "", "region": ""}
    assert (row["action"], row["outcome"], row["resource"], row["record_id"]) == ("create", "allowed", "csat", "c-1")
    assert row["before"] is None and row["after"]["score"] == 4 and row["after"]["channel"] == "customer"
    assert (row["status_code"], row["method"], row["path"]) == (201, "POST", SURVEY_PATH)
    assert KEY not in str(row)
    survey = await gateway.client.get(f"/api/v1/csat-surveys/{KEY}")
    assert (survey.json()["answered"], survey.json()["answerable"]) == (True, False)


async def test_an_answer_sent_again_under_its_idempotency_key_is_one_replay_row(gateway: Gateway) -> None:
    url = f"/api/v1/csat-surveys/{KEY}"
    for _ in range(2):
        response = await gateway.client.post(url, json={"score": 5}, headers={"Idempotency-Key": "scan-1"})
        assert response.status_code == 201, response.text

    assert [request.idempotency_key for request in gateway.desk.survey_requests] == ["scan-1", "scan-1"]
    replay, first = await gateway.audit_rows()  # newest first
    assert first["action"] == "create"
    assert (replay["action"], replay["record_id"], replay["after"]) == ("replay", "c-1", None)
    assert replay["actor"]["user_id"] == "survey:t-1" and replay["path"] == SURVEY_PATH


async def test_a_second_answer_and_an_expired_link_are_conflicts_saying_why(gateway: Gateway) -> None:
    assert (await gateway.client.post(f"/api/v1/csat-surveys/{KEY}", json={"score": 5})).status_code == 201

    again = await gateway.client.post(f"/api/v1/csat-surveys/{KEY}", json={"score": 1})
    expired = await gateway.client.post(f"/api/v1/csat-surveys/{EXPIRED_KEY}", json={"score": 1})

    assert (again.status_code, again.json()["reason"]) == (409, "DUPLICATE"), again.text
    assert "existing_id" not in again.json()
    assert (expired.status_code, expired.json()["reason"]) == (409, "SURVEY_EXPIRED"), expired.text
    # Refused answers wrote nothing; an expired key is a known one, not a guess: no denial either.
    assert [row["action"] for row in await gateway.audit_rows()] == ["create"]


# --- what never reaches the service ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"score": 0}, "score"),
        ({"score": 6}, "score"),
        ({"score": "great"}, "score"),
        ({"comment": "no score"}, "score"),
        ({"score": 5, "comment": "x" * 2001}, "comment"),  # as the staff route
        ({"score": 5, "channel": "staff"}, "channel"),  # nothing else is taken
    ],
)
async def test_a_bad_answer_is_a_422_naming_the_field(gateway: Gateway, body: dict[str, Any], field: str) -> None:
    response = await gateway.client.post(f"/api/v1/csat-surveys/{KEY}", json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert field in [error["field"] for error in response.json()["errors"]]
    assert gateway.desk.survey_requests == []
    assert await gateway.audit_rows() == []


@pytest.mark.parametrize("key", ["short", "x" * 65, "has.a.dot-0123456789", "has%20space-0123456789"])
async def test_a_key_of_another_shape_is_a_422_naming_it(gateway: Gateway, key: str) -> None:
    for response in (
        await gateway.client.get(f"/api/v1/csat-surveys/{key}"),
        await gateway.client.post(f"/api/v1/csat-surveys/{key}", json={"score": 5}),
    ):
        assert response.status_code == 422, response.text
        assert [error["field"] for error in response.json()["errors"]] == ["survey_key"]
    assert gateway.desk.survey_callers == []


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "action"), [("GET", "read_survey"), ("POST", "answer_survey")])
async def test_an_unknown_key_is_a_404_audited_as_a_denied_authentication(
    gateway: Gateway, method: str, action: str
) -> None:
    response = await gateway.client.request(method, "/api/v1/csat-surveys/guessed-key-1", json={"score": 5})

    assert response.status_code == 404, response.text
    [row] = await gateway.audit_rows()
    assert (row["action"], row["outcome"], row["resource"], row["status_code"]) == ("denied", "denied", "csat", 404)
    assert row["actor"]["kind"] == "anonymous" and row["reason"] == f"{action}: no such survey"
    assert row["path"] == SURVEY_PATH
    assert "guessed-key-1" not in str(row)


async def test_guessing_survey_keys_is_slowed_like_failed_logins(gateway: Gateway) -> None:
    url = "/api/v1/csat-surveys/guessed-key-{}"
    reads = [(await gateway.client.get(url.format(n))).status_code for n in range(3)]
    answers = [(await gateway.client.post(url.format(n), json={"score": 5})).status_code for n in range(2)]

    assert reads + answers == [404, 404, 404, 429, 429]  # a burst of 3, reads and answers alike, then waiting
    limited = await gateway.client.get("/api/v1/csat-surveys/guessed-key-9")
    assert limited.status_code == 429 and "Retry-After" in limited.headers
    assert limited.json()["detail"] == "too many requests to unknown surveys"
    assert len(await gateway.audit_rows()) == 3  # the refused guesses flood nothing
    known = await gateway.client.post(f"/api/v1/csat-surveys/{KEY}", json={"score": 5})
    assert known.status_code == 201  # a real link still takes its answer


# --- the key on the ticket, and the answers' channel ------------------------------------------------


@pytest.mark.parametrize(
    ("role", "sees_the_key"),
    [
        ("service_agent", True),  # enters CSAT answers (their own tickets)
        ("service_manager", True),
        ("admin", True),
        ("analyst", False),  # reads tickets and CSAT, enters no answer
        ("sales_rep", False),  # reads their own tickets
    ],
)
async def test_the_survey_key_is_shown_only_to_who_may_enter_csat_answers(
    gateway: Gateway, role: str, sees_the_key: bool
) -> None:
    headers = auth(role)
    detail = await gateway.client.get("/api/v1/tickets/t-1", headers=headers)
    listed = await gateway.client.get("/api/v1/tickets", headers=headers)

    assert detail.status_code == listed.status_code == 200, detail.text
    for ticket in (detail.json(), listed.json()["items"][0]):
        assert ticket["subject"] == "Printer jams"
        assert (ticket.get("survey_key") == KEY) == sees_the_key
        assert ("survey_key" in ticket) == sees_the_key


async def test_the_first_resolution_shows_the_new_key_to_who_may_and_never_audits_it(gateway: Gateway) -> None:
    """(Who may change a ticket's status may enter CSAT answers in the default policy: the key is
    hidden from other readers as `test_the_survey_key_is_shown_only_to_who_may_enter_csat_answers` shows.)"""
    resolved = await gateway.client.post(
        "/api/v1/tickets/t-1/status", json={"status": "resolved"}, headers=auth("service_agent")
    )

    assert resolved.status_code == 200, resolved.text
    assert (resolved.json()["status"], resolved.json()["survey_key"]) == ("resolved", KEY)
    [row] = await gateway.audit_rows()
    assert row["fields"] == ["resolved_at", "status", "version"]  # not the key the resolution drew
    assert "survey_key" not in row["before"] and "survey_key" not in row["after"]
    assert KEY not in str(row)


async def test_csat_answers_show_their_channel(gateway: Gateway) -> None:
    headers = auth("service_manager")
    staff = await gateway.client.post("/api/v1/tickets/t-9/csat", json={"score": 3}, headers=headers)
    listed = await gateway.client.get("/api/v1/csat", headers=headers)
    detail = await gateway.client.get("/api/v1/tickets/t-1", headers=headers)

    assert staff.status_code == 201, staff.text
    assert staff.json()["channel"] == "staff"
    assert [item["channel"] for item in listed.json()["items"]] == ["staff"]
    assert detail.json()["csat"]["channel"] == "customer"


async def test_the_survey_routes_are_documented_as_public(gateway: Gateway) -> None:
    paths = (await gateway.client.get("/openapi.json")).json()["paths"]
    get, post = paths[SURVEY_PATH]["get"], paths[SURVEY_PATH]["post"]

    assert not {"401", "403", "409"} & set(get["responses"]) and "429" in get["responses"]
    assert {"201", "409", "413", "422", "429"} <= set(post["responses"])
    assert not {"401", "403"} & set(post["responses"])
    assert "SURVEY_EXPIRED" in post["responses"]["409"]["description"]
    assert "Idempotency-Key" in [p["name"] for p in post["parameters"] if p["in"] == "header"]


async def test_a_ticket_export_never_holds_the_survey_key(gateway: Gateway) -> None:
    """A credential in a file passed around is a credential given away: not even an admin's export."""
    exported = await gateway.client.get("/api/v1/exports/tickets", headers=auth("admin"))

    assert exported.status_code == 200, exported.text
    header = exported.text.splitlines()[0].split(",")
    assert "subject" in header and "survey_key" not in header
    assert KEY not in exported.text


async def test_a_keyed_path_is_neither_traced_nor_logged_with_its_key(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Traces and logs are read more widely than the audit trail: a span's `url.path` or an error
    line holding the key would hand it out."""
    assert untraced({"path": f"/api/v1/csat-surveys/{KEY}"})
    assert untraced({"path": f"/api/v1/webforms/{KEY}/submissions"})
    assert not untraced({"path": "/api/v1/tickets/t-1"})

    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        failed = await gateway.client.get(f"/api/v1/csat-surveys/{BROKEN_KEY}")

    assert failed.status_code == 500, failed.text
    assert f"GET {SURVEY_PATH}" in caplog.text
    assert BROKEN_KEY not in caplog.text
