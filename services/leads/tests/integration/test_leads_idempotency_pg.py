"""An Idempotency-Key names one request. Through the real gateway and leads service: the same
request again with its key answers with the first result; another request with that key is a 422
naming the header, and creates nothing. A conversion resuming an attempt whose upstream answer was
lost still gets the record the attempt's key first created, though what it sends has changed."""

from typing import Any

import grpc
import httpx
import pytest
from accounts import repository as accounts_repo
from accounts.servicer import AccountsServicer
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm_platform.errors import Unavailable
from crm_platform.testing.races import count_rows
from leads import repository as repo
from leads.handlers import ConvertRequest
from sqlalchemy import select

pytestmark = pytest.mark.integration

REUSED_KEY = {"field": "Idempotency-Key", "message": "was used with a different request"}


async def test_a_lead_created_again_with_its_key_is_the_first_and_another_lead_with_that_key_is_refused(
    env: Any, admin: httpx.AsyncClient
) -> None:
    headers = {"Idempotency-Key": "create-li-lei"}
    body = {"name": "Li Lei", "company": "Acme", "email": "li.lei@example.com"}

    first = await admin.post("/api/v1/leads", json=body, headers=headers)
    again = await admin.post("/api/v1/leads", json=body, headers=headers)
    other = await admin.post(
        "/api/v1/leads", json={**body, "name": "Han Meimei", "email": "han@example.com"}, headers=headers
    )

    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422, other.text
    assert other.json()["errors"] == [REUSED_KEY]
    assert await count_rows(env.engine, repo.leads) == 1


async def test_a_web_form_submission_with_a_used_key_and_other_fields_is_refused(
    env: Any, admin: httpx.AsyncClient
) -> None:
    with env.acting("admin", roles=("admin",)):
        form = await env.service.create_webform({"name": "Expo signup"}, "")
    path = f"/api/v1/webforms/{form['form_key']}/submissions"
    headers = {"Idempotency-Key": "submission-1"}
    fields = {"name": "Li Lei", "email": "li.lei@example.com"}

    first = await admin.post(path, json=fields, headers=headers)
    again = await admin.post(path, json=fields, headers=headers)
    other = await admin.post(path, json={**fields, "name": "Han Meimei"}, headers=headers)

    assert (first.status_code, again.status_code) == (202, 202), again.text
    assert other.status_code == 422, other.text
    assert other.json()["errors"] == [REUSED_KEY]
    async with env.engine.connect() as conn:
        assert list((await conn.execute(select(repo.leads.c.name))).scalars()) == ["Li Lei"]


class AnswersLost(AccountsServicer):
    """The real accounts service, whose answers to CreateAccount are lost while `losing` is set: the
    account is created (or found by its key), but the caller hears UNAVAILABLE."""

    losing = True

    async def CreateAccount(self, request: accounts_pb.CreateAccountRequest, context: Any) -> Any:
        reply = await super().CreateAccount(request, context)
        if self.losing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return reply


async def test_a_conversion_resumed_with_other_options_gets_the_account_its_attempt_created(
    env: Any, accounts_over_grpc: Any
) -> None:
    async with accounts_over_grpc(AnswersLost) as (accounts, accounts_db):
        with env.acting("rep1"):
            lead, _ = await env.service.create_lead({"name": "Li Lei", "company": "Acme", "owner_id": "rep1"})
            with pytest.raises(Unavailable):
                await env.service.convert(ConvertRequest(lead["id"], account_name="Acme Holdings"))
            accounts.losing = False
            # The retry names the account otherwise: the attempt's account stands, as first created.
            converted = await env.service.convert(ConvertRequest(lead["id"], account_name="Acme Group"))
        async with accounts_db.connect() as conn:
            created = (await conn.execute(select(accounts_repo.accounts.c.id, accounts_repo.accounts.c.name))).all()
    assert created == [(converted.account_id, "Acme Holdings")]
    assert converted.lead["status"] == "converted"
