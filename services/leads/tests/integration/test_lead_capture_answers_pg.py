"""What a lead capture answers over gRPC, for the gateway's audit trail (SPEC §9): a merge sends the
lead as it was before (`previous`), so the merge is audited as the change it made, not as a second
create; a new lead sends none. A key's repeat gets the first answer again, and the gateway audits
it as a replay (nothing changed then). A web form's submission also names the form (its id, never
its key) and the lead. Through the real gateway, each is audited as what it did."""

from typing import Any

import httpx
import pytest
from crm.leads.v1 import leads_service_pb2 as pb
from crm.leads.v1 import leads_service_pb2_grpc
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from google.protobuf.field_mask_pb2 import FieldMask

pytestmark = pytest.mark.integration


METADATA = outgoing_metadata(Principal(user_id="rep1", roles=("sales_rep",), team="east"), RecordScope(ScopeKind.ALL))


async def test_a_merge_answers_with_the_lead_as_it_was_and_a_create_without(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    first = await stub.CreateLead(
        pb.CreateLeadRequest(lead=pb.LeadInput(name="Li Lei", email="li@example.com"), on_duplicate="merge"),
        metadata=METADATA,
    )
    merge = pb.CreateLeadRequest(
        lead=pb.LeadInput(name="Li", email="li@example.com", company="Acme"), on_duplicate="merge", idempotency_key="k1"
    )
    merged = await stub.CreateLead(merge, metadata=METADATA)
    again = await stub.CreateLead(merge, metadata=METADATA)

    assert not first.merged and not first.HasField("previous")
    assert merged.merged and merged.lead.id == first.lead.id
    assert merged.previous == first.lead  # as it was, before the merge gave it a company
    assert (merged.previous.company, merged.lead.company) == ("", "Acme")
    assert merged.lead.version == merged.previous.version + 1
    assert again == merged  # the first answer itself (SPEC §3), `previous` and all


async def test_a_create_repeated_with_its_key_answers_as_the_first_time_though_the_lead_changed_since(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    """SPEC §3: a repeated key returns the first result, not the lead as it is by then."""
    create = pb.CreateLeadRequest(lead=pb.LeadInput(name="Zhao", email="zhao@example.com"), idempotency_key="k2")
    first = await stub.CreateLead(create, metadata=METADATA)
    renamed = await stub.UpdateLead(
        pb.UpdateLeadRequest(
            lead_id=first.lead.id, lead=pb.LeadInput(name="Zhao Wei"), update_mask=FieldMask(paths=["name"])
        ),
        metadata=METADATA,
    )
    again = await stub.CreateLead(create, metadata=METADATA)
    current = await stub.GetLead(pb.GetLeadRequest(lead_id=first.lead.id), metadata=METADATA)

    assert again == first and (again.lead.name, again.lead.version) == ("Zhao", 1)
    assert current.lead == renamed.lead and current.lead.version == 2  # nothing was created or changed again


async def test_a_web_form_submission_answers_with_its_form_and_the_lead_before_and_after(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    with env.acting("mkt", roles=("marketing",)):
        form = await env.service.create_webform({"name": "Expo form", "rate_limit_per_minute": 5}, "")

    def submit(**fields: str) -> Any:
        return stub.SubmitWebform(pb.SubmitWebformRequest(form_key=form["form_key"], fields=fields))

    created = await submit(name="Sun", email="sun@x.cn")
    merged = await submit(name="Sun", email="sun@x.cn", company="Sun Ltd")

    assert (created.webform_id, merged.webform_id) == (form["id"], form["id"])
    assert not created.merged and not created.HasField("previous")
    assert created.lead.id == created.lead_id and created.lead.email == "sun@x.cn"
    assert merged.merged and merged.lead_id == created.lead_id
    assert merged.previous == created.lead
    assert (merged.previous.company, merged.lead.company) == ("", "Sun Ltd")


async def test_captures_through_the_gateway_are_audited_as_creates_merges_and_replays(
    env: Any, admin: httpx.AsyncClient
) -> None:
    with env.acting("admin", roles=("admin",)):
        form = await env.service.create_webform({"name": "Expo signup"}, "")
    path = f"/api/v1/webforms/{form['form_key']}/submissions"
    keyed = {"Idempotency-Key": "submission-1"}

    created = await admin.post(path, json={"name": "Sun", "email": "sun@x.cn"}, headers=keyed)
    repeated = await admin.post(path, json={"name": "Sun", "email": "sun@x.cn"}, headers=keyed)
    merged = await admin.post(path, json={"name": "Sun", "email": "sun@x.cn", "company": "Sun Ltd"})
    by_hand = await admin.post("/api/v1/leads?on_duplicate=merge", json={"email": "sun@x.cn", "title": "CTO"})

    assert [r.status_code for r in (created, repeated, merged, by_hand)] == [202, 202, 202, 200], by_hand.text
    events = (await admin.get("/api/v1/audit-events", params={"resource": "leads"})).json()["items"]
    lead_id = by_hand.json()["id"]
    form_actor = {"user_id": f"webform:{form['id']}", "kind": "webform"}
    assert [
        (e["action"], e["record_id"], {k: e["actor"][k] for k in ("user_id", "kind")}) for e in reversed(events)
    ] == [
        ("create", lead_id, form_actor),
        ("replay", lead_id, form_actor),
        ("merge", lead_id, form_actor),
        ("merge", lead_id, {"user_id": "u-1", "kind": "user"}),
    ]
    merge_by_form, merge_by_hand = events[1], events[0]
    assert "company" in merge_by_form["fields"] and "email" not in merge_by_form["fields"]
    assert (merge_by_form["before"]["company"], merge_by_form["after"]["company"]) == ("", "Sun Ltd")
    assert (merge_by_hand["before"]["title"], merge_by_hand["after"]["title"]) == ("", "CTO")
    assert form["form_key"] not in str(events)
