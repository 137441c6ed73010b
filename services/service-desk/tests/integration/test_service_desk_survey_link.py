"""A ticket's survey link (修完还能当场扫码让客户打分): the key a ticket gets at its first
resolution and keeps through reopenings, the survey it shows its customer, and the customer's own
answer through it, without a login: once per ticket (staff answers included), while the ticket is
resolved and for `survey_valid_days` after its resolution; the answer is evented with its channel.
On each database, as the gateway's public routes call it (an anonymous caller in no record scope),
and over gRPC with no principal at all."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import pytest
from crm.servicedesk.v1 import events_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from crm_platform import migrations
from crm_platform.cloudevents import spec_of
from crm_platform.db import create_engine
from crm_platform.errors import AlreadyExists, Conflict, NotFound, ValidationFailed
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.grpc_server import GrpcServer
from crm_platform.principal import (
    ALL_RECORDS,
    Principal,
    RecordScope,
    ScopeKind,
    acting_as,
    outgoing_metadata,
)
from crm_platform.testing.database import migrate_to_head
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS, SERVICE_NAME
from service_desk.handlers import Context
from service_desk.servicer import ServiceDeskServicer
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=Message)
AGENT = Principal(user_id="ag-1", roles=("service_agent",), region="north")
AGENT_SCOPE = RecordScope(ScopeKind.OWN, owner_id="ag-1")
# How the gateway's public routes reach the service: no principal, so nobody in scope `own`.
ANONYMOUS = (Principal(user_id="", kind="anonymous"), RecordScope(ScopeKind.OWN))


async def _resolved_ticket(ctx: Context, subject: str = "Printer jams", **values: Any) -> dict[str, Any]:
    """A ticket of agent ag-1 (its owner) in region north, resolved now (by ctx's clock)."""
    # The same key each time: the agent is created once, then answered as it was.
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Wu", "region": "north"}, idempotency_key="agent-ag-1")
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": subject, "region": "north", "account_id": "acme", **values}, idempotency_key=""
    )
    await _move(ctx, ticket["id"], "in_progress")
    return await _move(ctx, ticket["id"], "resolved")


async def _move(ctx: Context, ticket_id: str, status: str) -> dict[str, Any]:
    return (await handlers.change_status(ctx, ticket_id, status, expected_version=0, note="")).record


async def _events(ctx: Context, key: str, message_type: type[M]) -> list[M]:
    outbox = repo.metadata.tables["outbox"]
    kind = spec_of(message_type).type
    query = select(outbox.c.payload).where(outbox.c.key == key, outbox.c.type == kind).order_by(outbox.c.seq)
    async with ctx.uow.engine.connect() as conn:
        return [message_type.FromString(payload) for payload in await conn.scalars(query)]


async def _answer(ctx: Context, key: str, score: int = 5, comment: str = "", idempotency_key: str = "") -> Any:
    """The customer's answer, as the gateway's public route asks for it."""
    with acting_as(*ANONYMOUS):
        return await handlers.submit_csat_survey(ctx, key, score, comment, idempotency_key=idempotency_key)


async def _survey(ctx: Context, key: str) -> dict[str, Any]:
    with acting_as(*ANONYMOUS):
        return await handlers.get_csat_survey(ctx, key)


# --- the key ---------------------------------------------------------------------------------------


async def test_a_ticket_gets_its_survey_key_at_its_first_resolution_and_keeps_it(ctx: Context) -> None:
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Wu"}, idempotency_key="")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Printer jams"}, idempotency_key="")
    assert ticket["survey_key"] is None
    working = await _move(ctx, ticket["id"], "in_progress")
    assert working["survey_key"] is None  # none before the first resolution

    resolved = await _move(ctx, ticket["id"], "resolved")
    key = resolved["survey_key"]
    assert isinstance(key, str) and len(key) == 32  # secrets.token_urlsafe(24)
    # A reopening, a second resolution and the close keep it: a printed QR code keeps working.
    assert (await _move(ctx, ticket["id"], "reopened"))["survey_key"] == key
    assert (await _move(ctx, ticket["id"], "resolved"))["survey_key"] == key
    assert (await _move(ctx, ticket["id"], "closed"))["survey_key"] == key
    row, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
    assert row.survey_key == key
    # The resolution's event carries it, for whatever sends the customer their link; no other does
    # (a credential on the topic only where it is needed), nor names it as a changed field.
    [first, second] = await _events(ctx, ticket["id"], events_pb2.TicketResolved)
    assert first.ticket.survey_key == second.ticket.survey_key == key
    others = [
        *await _events(ctx, ticket["id"], events_pb2.TicketStatusChanged),
        *await _events(ctx, ticket["id"], events_pb2.TicketReopened),
        *await _events(ctx, ticket["id"], events_pb2.TicketClosed),
    ]
    assert len(others) >= 7 and all(event.ticket.survey_key == "" for event in others)


async def test_every_ticket_has_its_own_key_and_the_database_holds_each_once(ctx: Context) -> None:
    one = await _resolved_ticket(ctx, "One")
    two = await _resolved_ticket(ctx, "Two")
    assert one["survey_key"] != two["survey_key"]
    with pytest.raises(IntegrityError):
        async with ctx.uow.engine.begin() as conn:
            await conn.execute(
                update(repo.tickets).where(repo.tickets.c.id == two["id"]).values(survey_key=one["survey_key"])
            )


# --- the survey --------------------------------------------------------------------------------------


async def test_the_survey_shows_the_ticket_its_validity_and_whether_it_was_answered(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    ticket = await _resolved_ticket(ctx)

    survey = await _survey(ctx, ticket["survey_key"])
    assert survey == {
        "ticket_id": ticket["id"],
        "subject": "Printer jams",
        "resolved_at": start,
        "expires_at": start + timedelta(days=30),
        "answered": False,
        "answerable": True,
    }
    await _answer(ctx, ticket["survey_key"])
    answered = await _survey(ctx, ticket["survey_key"])
    assert (answered["answered"], answered["answerable"]) == (True, False)


async def test_the_survey_of_a_reopened_ticket_shows_no_resolution_and_takes_nothing(ctx: Context) -> None:
    ticket = await _resolved_ticket(ctx)
    await _move(ctx, ticket["id"], "reopened")

    survey = await _survey(ctx, ticket["survey_key"])
    assert (survey["resolved_at"], survey["expires_at"], survey["answerable"]) == (None, None, False)


@pytest.mark.parametrize("key", ["guessed-key-0000000000000000000000", ""])
async def test_an_unknown_key_is_not_found(ctx: Context, key: str) -> None:
    await _resolved_ticket(ctx)
    with pytest.raises(NotFound):
        await _survey(ctx, key)
    with pytest.raises(NotFound):
        await _answer(ctx, key)


# --- the customer's answer ---------------------------------------------------------------------------


async def test_the_customers_answer_is_stored_once_as_the_surveys_and_evented_with_its_channel(ctx: Context) -> None:
    ticket = await _resolved_ticket(ctx)

    answer = await _answer(ctx, ticket["survey_key"], 4, "Fixed on the spot")

    assert (answer["ticket_id"], answer["score"], answer["comment"]) == (ticket["id"], 4, "Fixed on the spot")
    assert answer["channel"] == "customer"
    assert answer["submitted_by_id"] == f"survey:{ticket['id']}"  # the survey, never its key
    # In the ticket's record scope, as an answer entered by staff: its agent lists it.
    assert (answer["account_id"], answer["owner_id"], answer["region"]) == ("acme", "ag-1", "north")
    with acting_as(AGENT, AGENT_SCOPE):
        listed, _ = await handlers.list_csat(ctx, ticket_id=ticket["id"], account_id="", page=handlers.Page())
        _, _, _, on_the_ticket = await handlers.get_ticket(ctx, ticket["id"])
    assert [(r.id, r.channel) for r in listed] == [(answer["id"], "customer")]
    assert on_the_ticket.channel == "customer"
    [event] = await _events(ctx, ticket["id"], events_pb2.CsatSubmitted)  # keyed by the ticket
    assert (event.response.id, event.response.channel, event.response.score) == (answer["id"], "customer", 4)
    assert (event.actor.user_id, event.actor.kind) == (f"survey:{ticket['id']}", "customer")

    with pytest.raises(AlreadyExists) as again:
        await _answer(ctx, ticket["survey_key"], 1)
    assert again.value.existing_id == ""  # a public caller is told no internal id
    with pytest.raises(AlreadyExists):  # nor may staff enter a second one
        await handlers.submit_csat(ctx, ticket["id"], 2, "", idempotency_key="")
    assert len(await _events(ctx, ticket["id"], events_pb2.CsatSubmitted)) == 1


async def test_an_answer_entered_by_staff_closes_the_survey_to_the_customer(ctx: Context) -> None:
    ticket = await _resolved_ticket(ctx)
    with acting_as(AGENT, AGENT_SCOPE):
        staff = await handlers.submit_csat(ctx, ticket["id"], 3, "by phone", idempotency_key="")
    assert (staff["channel"], staff["submitted_by_id"]) == ("staff", "ag-1")
    [event] = await _events(ctx, ticket["id"], events_pb2.CsatSubmitted)
    assert (event.response.channel, event.actor.user_id) == ("staff", "ag-1")

    with pytest.raises(AlreadyExists):
        await _answer(ctx, ticket["survey_key"])
    assert (await _survey(ctx, ticket["survey_key"]))["answered"] is True


async def test_an_answer_sent_again_under_its_idempotency_key_is_the_first_one(ctx: Context) -> None:
    ticket = await _resolved_ticket(ctx)
    first = await _answer(ctx, ticket["survey_key"], 5, "great", idempotency_key="scan-1")
    again = await _answer(ctx, ticket["survey_key"], 5, "great", idempotency_key="scan-1")
    assert again.id == first["id"] and again.channel == "customer"
    assert len(await _events(ctx, ticket["id"], events_pb2.CsatSubmitted)) == 1


async def test_an_expired_survey_takes_no_answer(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    ctx.survey_valid_days = 7
    ticket = await _resolved_ticket(ctx)

    ctx.clock = lambda: start + timedelta(days=7)
    with pytest.raises(Conflict) as expired:
        await _answer(ctx, ticket["survey_key"])
    assert expired.value.reason == "SURVEY_EXPIRED"
    survey = await _survey(ctx, ticket["survey_key"])
    assert (survey["expires_at"], survey["answered"], survey["answerable"]) == (start + timedelta(days=7), False, False)

    ctx.clock = lambda: start + timedelta(days=7) - timedelta(seconds=1)  # its last second
    assert (await _answer(ctx, ticket["survey_key"]))["channel"] == "customer"


async def test_a_reopened_ticket_takes_no_answer_until_it_is_resolved_again(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    ctx.survey_valid_days = 7
    ticket = await _resolved_ticket(ctx)
    ctx.clock = lambda: start + timedelta(days=1)
    await _move(ctx, ticket["id"], "reopened")

    with pytest.raises(Conflict) as reopened:
        await _answer(ctx, ticket["survey_key"])
    assert reopened.value.reason == "TICKET_NOT_RESOLVED"

    # Resolved again 10 days after the first resolution: the link counts from the new one.
    ctx.clock = lambda: start + timedelta(days=10)
    await _move(ctx, ticket["id"], "resolved")
    ctx.clock = lambda: start + timedelta(days=12)
    survey = await _survey(ctx, ticket["survey_key"])
    assert survey["expires_at"] == start + timedelta(days=17)
    assert (await _answer(ctx, ticket["survey_key"], 2))["score"] == 2


async def test_a_closed_ticket_takes_the_answer_and_a_bad_score_names_the_field(ctx: Context) -> None:
    ticket = await _resolved_ticket(ctx)
    await _move(ctx, ticket["id"], "closed")
    with pytest.raises(ValidationFailed) as bad:
        await _answer(ctx, ticket["survey_key"], 6)
    assert [e.field for e in bad.value.errors] == ["score"]
    assert (await _answer(ctx, ticket["survey_key"], 1))["score"] == 1


# --- over gRPC, without a principal ------------------------------------------------------------------


@pytest.fixture
async def public_stub(ctx_on_postgres: Context) -> AsyncIterator[tuple[ServiceDeskServiceStub, Context]]:
    """The service's RPCs behind the interceptor every service runs (`crm_platform.grpc_server`)."""
    from crm.servicedesk.v1.servicedesk_service_pb2_grpc import add_ServiceDeskServiceServicer_to_server

    servicer = ServiceDeskServicer(ctx_on_postgres)
    server = GrpcServer(
        service="service-desk",
        service_names=[SERVICE_NAME],
        register=lambda s: add_ServiceDeskServiceServicer_to_server(servicer, s),
    )
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ServiceDeskServiceStub(channel), ctx_on_postgres
    finally:
        await channel.close()
        await server.stop(None)


async def test_the_survey_rpcs_answer_a_caller_without_a_principal(
    public_stub: tuple[ServiceDeskServiceStub, Context],
) -> None:
    stub, ctx = public_stub
    with acting_as(AGENT, ALL_RECORDS):
        ticket = await _resolved_ticket(ctx)
    key = ticket["survey_key"]

    survey = (await stub.GetCsatSurvey(pb.GetCsatSurveyRequest(survey_key=key), timeout=15)).survey
    assert (survey.ticket_id, survey.subject, survey.answered, survey.answerable) == (
        ticket["id"], "Printer jams", False, True
    )  # fmt: skip
    assert survey.expires_at.ToDatetime(UTC) - survey.resolved_at.ToDatetime(UTC) == timedelta(days=30)
    request = pb.SubmitCsatSurveyRequest(survey_key=key, score=5, comment="quick", idempotency_key="k-1")
    answer = (await stub.SubmitCsatSurvey(request, timeout=15)).response
    assert (answer.ticket_id, answer.score, answer.channel) == (ticket["id"], 5, "customer")
    repeat = await stub.SubmitCsatSurvey(request, timeout=15)
    assert repeat.response == answer

    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await stub.SubmitCsatSurvey(pb.SubmitCsatSurveyRequest(survey_key=key, score=1), timeout=15)
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.GetCsatSurvey(pb.GetCsatSurveyRequest(survey_key="guessed-key-1"), timeout=15)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Without the key, the anonymous caller sees nothing of the ticket.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await stub.GetTicket(pb.GetTicketRequest(ticket_id=ticket["id"]), timeout=15)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_expired_survey_is_a_failed_precondition_with_its_reason(
    public_stub: tuple[ServiceDeskServiceStub, Context],
) -> None:
    stub, ctx = public_stub
    start = utcnow()
    ctx.clock = lambda: start
    with acting_as(AGENT, ALL_RECORDS):
        ticket = await _resolved_ticket(ctx)
    ctx.clock = lambda: start + timedelta(days=31)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitCsatSurvey(pb.SubmitCsatSurveyRequest(survey_key=ticket["survey_key"], score=4), timeout=15)
    remote = from_rpc_error(caught.value)
    assert (remote.code, remote.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SURVEY_EXPIRED")
    # A caller with a principal gets the same: the key, not the caller, decides.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.SubmitCsatSurvey(
            pb.SubmitCsatSurveyRequest(survey_key=ticket["survey_key"], score=4),
            metadata=outgoing_metadata(AGENT, AGENT_SCOPE),
            timeout=15,
        )
    assert from_rpc_error(again.value).reason == "SURVEY_EXPIRED"


# --- the migration -----------------------------------------------------------------------------------


async def test_answers_stored_before_the_link_existed_were_entered_by_staff(postgres_url: str) -> None:
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, postgres_url, "0015")
    engine = create_engine(postgres_url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO csat_responses (id, ticket_id, account_id, score, comment, submitted_by_id, "
                    "owner_id, team, region, submitted_at) VALUES ('c-old', 't-old', '', 4, '', 'ag-1', '', '', '', "
                    ":now)"
                ),
                {"now": now},
            )
        await migrate_to_head(postgres_url, MIGRATIONS)
        async with engine.connect() as conn:
            table = repo.csat_responses
            channel = await conn.scalar(select(table.c.channel).where(table.c.id == "c-old"))
        assert channel == "staff"
    finally:
        await engine.dispose()
