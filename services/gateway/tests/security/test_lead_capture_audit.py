"""A lead capture is audited as what it did (SPEC §9): a new lead is a `create`; a merge into an
open duplicate (`POST /leads?on_duplicate=merge`, or a web form's submission) is a `merge` of that
lead, with the fields the merge changed, as they were and as they are, personal data masked. A web
form's submission is audited with the form as its actor (by id, never by its key); one refused or
discarded as a bot's wrote nothing and leaves no row. Real routes, against a fake leads service."""

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm_platform.idempotency import REPLAYED_METADATA
from fastapi import FastAPI
from gateway.app import create_app
from gateway.config import Settings
from gateway.security.audit import AuditQuery
from gateway.testing import serving
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "lead-capture-audit-secret-" + "c" * 30
FORM_KEY = "secret-form-key-1"

# The open lead Li already is, and what a merge of her new phone and company leaves of it.
KNOWN = leads_pb2.Lead(
    id="l-1", name="Li", email="li@example.com", status="new", owner_id="u-1", team="east", score=10, version=1
)
MERGED = leads_pb2.Lead(
    id="l-1", name="Li", email="li@example.com", phone="13812345678", company="Acme", status="new",
    owner_id="u-1", team="east", score=25, version=2,
)  # fmt: skip


class CapturingLeads(LeadsServiceServicer):
    """Merges whatever names Li's email into her lead, creates any other lead (`l-2`), and repeats
    its earlier answer to a submission under an Idempotency-Key it has seen."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def _capture(self, name: str, email: str, phone: str, merge: bool) -> tuple[leads_pb2.Lead, leads_pb2.Lead | None]:
        """(the lead after, the lead before) of a capture; before is None for a new lead."""
        if merge and email == KNOWN.email:
            return MERGED, KNOWN
        return leads_pb2.Lead(id="l-2", name=name, email=email, phone=phone, status="new", version=1), None

    async def CreateLead(self, request: leads_pb.CreateLeadRequest, context: Any) -> Any:
        lead = request.lead
        after, before = self._capture(lead.name, lead.email, lead.phone, request.on_duplicate == "merge")
        return leads_pb.CreateLeadResponse(lead=after, merged=before is not None, previous=before)

    async def SubmitWebform(self, request: leads_pb.SubmitWebformRequest, context: Any) -> Any:
        if request.form_key != FORM_KEY:
            await context.abort(grpc.StatusCode.NOT_FOUND, "webform not found")
        fields = request.fields
        if fields.get("fax"):  # the form's honeypot
            return leads_pb.SubmitWebformResponse(discarded_as_spam=True)
        after, before = self._capture(fields.get("name", ""), fields.get("email", ""), fields.get("phone", ""), True)
        if request.idempotency_key in self.keys:  # as the service repeats a key's earlier result
            context.set_trailing_metadata((REPLAYED_METADATA,))
            before = None
        self.keys.add(request.idempotency_key)
        return leads_pb.SubmitWebformResponse(
            lead_id=after.id, merged=after.id == KNOWN.id, webform_id="wf-7", lead=after, previous=before
        )


class Gateway:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @staticmethod
    def auth(role: str) -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub="u-1", roles=[role], team="east", region="north")
        return {"Authorization": f"Bearer {token}"}

    async def audit_rows(self) -> list[dict[str, Any]]:
        rows, _ = await self.app.state.security.audit.query(AuditQuery())
        return rows  # type: ignore[no-any-return]


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Gateway]:
    leads = CapturingLeads()  # type: ignore[abstract]
    async with serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as target:
        database = tmp_path / "gateway.db"
        shutil.copyfile(migrated_sqlite, database)
        settings = Settings(
            dev_mode=True,
            dev_jwt_secret=SECRET,
            database_url=f"sqlite+aiosqlite:///{database}",
            leads_target=target,
            accounts_target="",
            sales_target="",
            service_desk_target="",
            analytics_target="",
            audit_relay_enabled=False,
            audit_ingest_enabled=False,
            auth_failure_burst=3,
        )
        app = create_app(settings)
        await app.state.security.start(migrate=False, relay=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            yield Gateway(app, client)
        await app.state.upstreams.close()
        await app.state.security.stop()


# What the merge changed, as it was and as it is, personal data masked.
MERGE_FIELDS = ["company", "phone", "score", "version"]
MERGE_BEFORE = {"company": "", "phone": "", "score": 10, "version": 1}
MERGE_AFTER = {"company": "Acme", "phone": "138****5678", "score": 25, "version": 2}


async def test_a_merge_is_audited_as_a_merge_of_the_existing_lead_with_only_what_it_changed(
    gateway: Gateway,
) -> None:
    body = {"name": "Li Lei", "email": "li@example.com", "phone": "13812345678", "company": "Acme"}
    response = await gateway.client.post(
        "/api/v1/leads?on_duplicate=merge", json=body, headers=gateway.auth("sales_rep")
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-merged-into"] == "l-1"
    [row] = await gateway.audit_rows()
    assert (row["action"], row["outcome"], row["record_id"], row["status_code"]) == ("merge", "allowed", "l-1", 200)
    assert row["actor"]["user_id"] == "u-1"
    assert row["fields"] == MERGE_FIELDS
    assert (row["before"], row["after"]) == (MERGE_BEFORE, MERGE_AFTER)


async def test_a_new_lead_is_still_audited_as_a_create_with_all_its_fields(gateway: Gateway) -> None:
    body = {"name": "Wu", "email": "wu@example.com", "phone": "13912345678"}
    response = await gateway.client.post(
        "/api/v1/leads?on_duplicate=merge", json=body, headers=gateway.auth("sales_rep")
    )

    assert response.status_code == 201, response.text
    [row] = await gateway.audit_rows()
    assert (row["action"], row["record_id"], row["before"], row["status_code"]) == ("create", "l-2", None, 201)
    assert row["after"]["email"] == "w***@example.com" and row["after"]["phone"] == "139****5678"
    assert {"name", "email", "phone", "status"} <= set(row["fields"])


async def test_a_web_form_submission_creating_a_lead_is_audited_as_a_create_by_the_form(gateway: Gateway) -> None:
    body = {"name": "Wu", "email": "wu@example.com", "budget": "high"}
    response = await gateway.client.post(f"/api/v1/webforms/{FORM_KEY}/submissions", json=body)

    assert response.status_code == 202, response.text
    assert response.json() == {"status": "received"}  # the answer says nothing of the lead
    [row] = await gateway.audit_rows()
    assert row["actor"] == {"user_id": "webform:wf-7", "kind": "webform", "roles": [], "team": "", "region": ""}
    assert (row["action"], row["resource"], row["record_id"], row["before"]) == ("create", "leads", "l-2", None)
    assert row["status_code"] == 202 and row["after"]["email"] == "w***@example.com"
    # The key is the form's credential: the audit trail never holds it, not even in the path.
    assert row["path"] == "/api/v1/webforms/{form_key}/submissions"
    assert FORM_KEY not in str(row)


async def test_a_web_form_submission_merging_into_a_lead_is_audited_as_a_merge_by_the_form(gateway: Gateway) -> None:
    body = {"name": "Li Lei", "email": "li@example.com", "phone": "13812345678", "company": "Acme"}
    response = await gateway.client.post(f"/api/v1/webforms/{FORM_KEY}/submissions", json=body)

    assert response.status_code == 202, response.text
    [row] = await gateway.audit_rows()
    assert (row["action"], row["record_id"], row["actor"]["user_id"]) == ("merge", "l-1", "webform:wf-7")
    assert row["fields"] == MERGE_FIELDS
    assert (row["before"], row["after"]) == (MERGE_BEFORE, MERGE_AFTER)


async def test_a_web_form_submission_sent_again_under_its_key_is_one_replay_row(gateway: Gateway) -> None:
    url = f"/api/v1/webforms/{FORM_KEY}/submissions"
    body = {"name": "Li Lei", "email": "li@example.com", "phone": "13812345678"}
    for _ in range(2):
        response = await gateway.client.post(url, json=body, headers={"Idempotency-Key": "k-1"})
        assert response.status_code == 202, response.text

    replay, first = await gateway.audit_rows()  # newest first
    assert first["action"] == "merge"
    assert (replay["action"], replay["record_id"], replay["fields"], replay["after"]) == ("replay", "l-1", [], None)
    assert replay["reason"].startswith("merge: ")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Bot", "email": "bot@example.com", "fax": "+1 555"},  # the honeypot: discarded
        {"name": "x" * 201},  # refused: 422
    ],
)
async def test_a_web_form_submission_that_wrote_nothing_leaves_no_audit_row(
    gateway: Gateway, body: dict[str, Any]
) -> None:
    response = await gateway.client.post(f"/api/v1/webforms/{FORM_KEY}/submissions", json=body)

    assert response.status_code in (202, 422), response.text
    assert await gateway.audit_rows() == []


async def test_a_submission_to_an_unknown_form_key_is_audited_as_a_denied_authentication(gateway: Gateway) -> None:
    response = await gateway.client.post("/api/v1/webforms/guessed-key-1/submissions", json={"name": "Wu"})

    assert response.status_code == 404, response.text
    [row] = await gateway.audit_rows()
    assert (row["action"], row["outcome"], row["resource"], row["status_code"]) == ("denied", "denied", "webforms", 404)
    assert row["actor"]["kind"] == "anonymous"
    assert row["path"] == "/api/v1/webforms/{form_key}/submissions"
    assert "guessed-key-1" not in str(row)


async def test_guessing_form_keys_is_slowed_like_failed_logins(gateway: Gateway) -> None:
    answers = [
        (await gateway.client.post(f"/api/v1/webforms/guessed-key-{n}/submissions", json={"name": "Wu"})).status_code
        for n in range(5)
    ]

    assert answers == [404, 404, 404, 429, 429]  # a burst of 3, then waiting
    assert len(await gateway.audit_rows()) == 3  # the refused guesses flood nothing
    known = await gateway.client.post(f"/api/v1/webforms/{FORM_KEY}/submissions", json={"name": "Wu"})
    assert known.status_code == 202  # a real form still takes submissions
