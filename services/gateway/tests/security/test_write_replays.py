"""`Idempotency-Key` on writes whose service takes no key (SPEC §3: writes accept it; a repeated key
returns the first result). The real gateway, in front of a fake service desk that counts the edits
it is asked for; and the store of kept answers on both databases."""

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.db import create_engine
from crm_platform.errors import Conflict, FieldError, ValidationFailed
from crm_platform.timeutil import utcnow
from fastapi.exceptions import RequestValidationError
from gateway.replays import REPLAYED_HEADER, write_fingerprint
from gateway.security.replays import IN_PROGRESS, STALLED_AFTER, Claim, KeptAnswer, WriteReplays
from gateway.security.store import migrate_async, write_replays
from gateway.testing import add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token
from sqlalchemy import update
from starlette.requests import Request

pytestmark = pytest.mark.integration

SECRET = "write-replays-" + "w" * 30


class CountingServiceDesk(ServiceDeskServiceServicer):
    """Ticket t-1, each edit applied anew to a version counter; a blank subject is refused."""

    def __init__(self) -> None:
        self.ticket = servicedesk_pb2.Ticket(id="t-1", subject="Printer", priority="normal", version=1)
        self.edits = 0

    async def UpdateTicket(self, request: desk_pb.UpdateTicketRequest, context: Any) -> Any:
        self.edits += 1
        if "subject" in request.update_mask.paths and not request.ticket.subject.strip():
            await refuse(context, ValidationFailed([FieldError("subject", "is required")]))
        previous = servicedesk_pb2.Ticket()
        previous.CopyFrom(self.ticket)
        request.update_mask.MergeMessage(request.ticket, self.ticket)
        self.ticket.version += 1
        return desk_pb.UpdateTicketResponse(ticket=self.ticket, previous=previous)


@pytest.fixture
def desk() -> CountingServiceDesk:
    return CountingServiceDesk()  # type: ignore[abstract]  # the calls these tests make only


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path, desk: CountingServiceDesk) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving(lambda server: add_ServiceDeskServiceServicer_to_server(desk, server), add_no_custom_fields) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, service_desk=target) as client,
    ):
        yield client


def headers(key: str, sub: str = "u-1", role: str = "service_manager", region: str = "north") -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region=region)
    return {"Authorization": f"Bearer {token}", "Idempotency-Key": key}


async def test_an_edit_sent_again_under_its_key_answers_the_first_result_and_is_not_made_again(
    gateway: httpx.AsyncClient, desk: CountingServiceDesk
) -> None:
    first = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("edit-1"))
    again = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("edit-1"))

    assert first.status_code == again.status_code == 200, first.text
    assert again.json() == first.json() and again.headers["ETag"] == first.headers["ETag"] == '"2"'
    assert again.headers[REPLAYED_HEADER] == "true" and REPLAYED_HEADER not in first.headers
    assert desk.edits == 1


async def test_a_used_key_sent_with_another_request_is_a_422_naming_it_and_nothing_is_done(
    gateway: httpx.AsyncClient, desk: CountingServiceDesk
) -> None:
    await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("edit-2"))
    other_body = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Toner"}, headers=headers("edit-2"))
    # The caller's grants are part of the request: the first answer was shown under them.
    other_region = await gateway.patch(
        "/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("edit-2", region="south")
    )

    for refused in (other_body, other_region):
        assert refused.status_code == 422, refused.text
        assert [error["field"] for error in refused.json()["errors"]] == ["Idempotency-Key"]
    assert desk.edits == 1


async def test_a_failed_first_request_keeps_nothing_and_its_retry_runs_again(
    gateway: httpx.AsyncClient, desk: CountingServiceDesk
) -> None:
    refused = await gateway.patch("/api/v1/tickets/t-1", json={"subject": " "}, headers=headers("edit-3"))
    retried = await gateway.patch("/api/v1/tickets/t-1", json={"subject": " "}, headers=headers("edit-3"))

    assert refused.status_code == retried.status_code == 422
    assert REPLAYED_HEADER not in retried.headers
    assert desk.edits == 2


async def test_keys_are_each_callers_own(gateway: httpx.AsyncClient, desk: CountingServiceDesk) -> None:
    mine = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("same-key"))
    theirs = await gateway.patch(
        "/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("same-key", sub="u-2")
    )

    assert (mine.status_code, theirs.status_code) == (200, 200)
    assert REPLAYED_HEADER not in theirs.headers
    assert desk.edits == 2


async def test_a_key_longer_than_kept_is_a_422_naming_it(gateway: httpx.AsyncClient, desk: CountingServiceDesk) -> None:
    response = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=headers("k" * 201))

    assert response.status_code == 422
    assert [error["field"] for error in response.json()["errors"]] == ["Idempotency-Key"]
    assert desk.edits == 0


# --- the store ------------------------------------------------------------------------------------


@pytest.fixture
async def replays(each_database_url: str) -> AsyncIterator[WriteReplays]:
    await migrate_async(each_database_url)
    engine = create_engine(each_database_url)
    yield WriteReplays(engine)
    await engine.dispose()


ANSWER = KeptAnswer(200, {"etag": '"2"'}, b'{"id": "t-1"}')


async def test_a_key_still_running_is_a_409_until_its_answer_is_kept(replays: WriteReplays) -> None:
    claim = await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f1")
    assert isinstance(claim, Claim)
    with pytest.raises(Conflict) as running:
        await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f1")
    await replays.keep("user:u-1", "PATCH /tickets/{id}", "k", claim, ANSWER)

    assert running.value.reason == IN_PROGRESS
    assert await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f1") == ANSWER
    with pytest.raises(RequestValidationError):
        await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f2")


async def test_a_stalled_key_is_taken_over_and_the_stalled_request_can_then_neither_keep_nor_free_it(
    replays: WriteReplays,
) -> None:
    route = "DELETE /segments/{id}"
    stalled = await replays.claim("user:u-1", route, "k", "f")
    async with replays.engine.begin() as conn:
        await conn.execute(update(write_replays).values(created_at=utcnow() - STALLED_AFTER - timedelta(seconds=1)))
    retry = await replays.claim("user:u-1", route, "k", "f")  # its gateway stopped, presumably
    assert isinstance(stalled, Claim) and isinstance(retry, Claim) and retry != stalled

    await replays.release("user:u-1", route, "k", stalled)  # it ended after all, and failed: the retry holds on
    with pytest.raises(Conflict):
        await replays.claim("user:u-1", route, "k", "f")
    await replays.keep("user:u-1", route, "k", stalled, KeptAnswer(500, {}, b"late"))  # nor is its answer kept
    await replays.keep("user:u-1", route, "k", retry, ANSWER)
    assert await replays.claim("user:u-1", route, "k", "f") == ANSWER


async def test_a_released_key_runs_again(replays: WriteReplays) -> None:
    first = await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f")
    assert isinstance(first, Claim)
    await replays.release("user:u-1", "PATCH /tickets/{id}", "k", first)

    assert isinstance(await replays.claim("user:u-1", "PATCH /tickets/{id}", "k", "f"), Claim)


def _request(query: str, content_type: str = "application/json") -> Request:
    headers = [(b"content-type", content_type.encode())]
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/api/v1/leads/import",
            "query_string": query.encode(),
            "headers": headers,
        }
    )


def test_a_request_is_told_apart_by_its_query_in_any_order_and_by_how_its_body_is_read() -> None:
    same = write_fingerprint(_request("a=1&b=2"), b"x", "g")
    assert write_fingerprint(_request("b=2&a=1"), b"x", "g") == same
    assert write_fingerprint(_request("a=1&b=3"), b"x", "g") != same
    assert write_fingerprint(_request("a=1&b=2", "text/csv; charset=gbk"), b"x", "g") != same  # another file
    assert write_fingerprint(_request("a=1&b=2"), b"y", "g") != same
    assert write_fingerprint(_request("a=1&b=2"), b"x", "other grants") != same
