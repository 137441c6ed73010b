"""POST /lead-engagements: web behaviour a marketing system reports (page views, e-mail opens and
clicks, downloads, webinars) for lead scoring. It takes `leads:update` (marketing, whose API key
carries that grant, may; an analyst may not), answers item by item as an import part answers row by
row, refuses a body of the wrong shape with a 422 naming the field before the service is called, and
is on the audit trail once per request with its counts. The scoring-rule routes take the engagement
condition. GET /leads/{id}/engagements lists a lead's as reading the lead is permitted (`leads:read`),
in the caller's record scope, a page at a time, each URL without its query string to who reads the
lead's email or phone masked. The real gateway app over a fake leads service."""

from typing import Any

import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm_platform.errors import FieldError, NotFound, ValidationFailed
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from crm_platform.timeutil import from_timestamp
from gateway.testing import RoleClient, grant_fields, refuse, serving
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration

PATH = "/api/v1/lead-engagements"
VIEW = {
    "lead_id": "lead-1",
    "kind": "page_view",
    "url": "https://x.cn/product",
    "occurred_at": "2026-12-18T09:00:00Z",
    "external_id": "evt-1",
}
KINDS = ("page_view", "email_open", "email_click", "download", "webinar")
# The leads the fake service lists engagements of: (owner, team, region), which decide whose record
# scope holds each.
LEADS = {"lead-1": ("u-1", "east", "north"), "lead-2": ("u-2", "west", "south")}
LISTED = leads_pb2.Engagement(
    id="eng-2",
    lead_id="lead-1",
    kind="page_view",
    url="https://x.cn/product",
    occurred_at=Timestamp(seconds=1_797_584_400),  # 2026-12-18T09:00:00Z
    external_id="evt-2",
    actor_id="mkt",
    recorded_at=Timestamp(seconds=1_797_584_460),
)


class RecordingEngagements(LeadsServiceServicer):
    """Records the first sight of each (lead, external_id), a resend a duplicate; an unknown kind is
    rejected naming its field, as the service does. Keeps each request with its record scope, and
    scoring rules as sent (an unknown engagement kind refused as the service refuses it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[pb.RecordLeadEngagementsRequest, RecordScope]] = []
        self.seen: set[tuple[str, str]] = set()
        self.rules: list[leads_pb2.ScoringRule] = []
        self.listed: list[tuple[pb.ListLeadEngagementsRequest, RecordScope]] = []
        self.page: list[leads_pb2.Engagement] = [LISTED]

    async def RecordLeadEngagements(
        self, request: pb.RecordLeadEngagementsRequest, context: Any
    ) -> pb.RecordLeadEngagementsResponse:
        self.calls.append((request, context_from_metadata(context.invocation_metadata()).scope))
        answer = pb.RecordLeadEngagementsResponse()
        for index, item in enumerate(request.items):
            if item.kind not in KINDS:
                field = f"items[{index}].kind"
                answer.results.add(index=index, status="rejected", reason=f"{field}: unknown", field=field)
                answer.rejected += 1
            elif (item.lead_id, item.external_id) in self.seen:
                answer.results.add(index=index, status="duplicate", lead_id=item.lead_id)
                answer.duplicates += 1
            else:
                self.seen.add((item.lead_id, item.external_id))
                answer.results.add(index=index, status="recorded", lead_id=item.lead_id)
                answer.recorded += 1
        return answer

    async def ListLeadEngagements(
        self, request: pb.ListLeadEngagementsRequest, context: Any
    ) -> pb.ListLeadEngagementsResponse:
        """A page of one engagement; a lead out of the call's record scope is NOT_FOUND, as one that
        does not exist, as the service answers."""
        scope = context_from_metadata(context.invocation_metadata()).scope
        self.listed.append((request, scope))
        lead = LEADS.get(request.lead_id)
        if lead is None or not scope.allows(owner_id=lead[0], team=lead[1], region=lead[2]):
            await refuse(context, NotFound("lead", request.lead_id))
        return pb.ListLeadEngagementsResponse(items=self.page, page_info=common_pb2.PageInfo(next_cursor="page-2"))

    async def CreateScoringRule(
        self, request: pb.CreateScoringRuleRequest, context: Any
    ) -> pb.CreateScoringRuleResponse:
        if request.rule.engagement_kind and request.rule.engagement_kind not in KINDS:
            await refuse(context, ValidationFailed([FieldError("engagement_kind", "is not an engagement kind")]))
        rule = leads_pb2.ScoringRule()
        rule.CopyFrom(request.rule)
        rule.id, rule.version = "rule-1", 1
        self.rules.append(rule)
        return pb.CreateScoringRuleResponse(rule=rule)


@pytest.fixture
def leads() -> RecordingEngagements:
    return RecordingEngagements()


async def test_marketing_records_engagements_and_is_answered_item_by_item(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements
) -> None:
    items = [VIEW, {**VIEW, "external_id": "evt-2", "lead_id": "", "email": "ann@example.com"}, {**VIEW, "kind": "tv"}]
    first = await leads_http.post(PATH, json={"items": items}, headers=leads_auth("marketing"))
    again = await leads_http.post(PATH, json={"items": items[:1]}, headers=leads_auth("marketing"))

    assert first.status_code == 200, first.text
    assert first.json() == {
        "results": [
            {"index": 0, "status": "recorded", "lead_id": "lead-1", "reason": "", "field": ""},
            {"index": 1, "status": "recorded", "lead_id": "", "reason": "", "field": ""},
            {
                "index": 2,
                "status": "rejected",
                "lead_id": "",
                "reason": "items[2].kind: unknown",
                "field": "items[2].kind",
            },
        ],
        "recorded": 2,
        "duplicates": 0,
        "rejected": 1,
    }
    assert again.json()["results"][0]["status"] == "duplicate"
    (request, scope), _ = leads.calls
    sent = request.items[1]
    assert (sent.lead_id, sent.email, sent.kind, sent.url, sent.external_id) == (
        "",
        "ann@example.com",
        "page_view",
        "https://x.cn/product",
        "evt-2",
    )
    assert from_timestamp(sent.occurred_at).isoformat() == "2026-12-18T09:00:00+00:00"  # type: ignore[union-attr]
    assert not request.items[0].email
    assert scope.kind is ScopeKind.ALL


async def test_an_item_without_a_time_goes_to_the_service_to_reject(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements
) -> None:
    item = {key: value for key, value in VIEW.items() if key != "occurred_at"}
    response = await leads_http.post(PATH, json={"items": [item]}, headers=leads_auth("marketing"))

    assert response.status_code == 200, response.text
    [(request, _)] = leads.calls
    assert not request.items[0].HasField("occurred_at")  # the service rejects it, naming items[0].occurred_at


@pytest.mark.parametrize("role", ["analyst", "service_agent"])
async def test_a_caller_who_may_not_update_leads_may_not_record_engagements(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, role: str
) -> None:
    response = await leads_http.post(PATH, json={"items": [VIEW]}, headers=leads_auth(role))

    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert leads.calls == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["items"]),
        ({"items": [VIEW] * 501}, ["items"]),
        ({"items": [{**VIEW, "occurred_at": "yesterday"}]}, ["items[0].occurred_at"]),
        ({"items": [VIEW, {**VIEW, "url": "u" * 2001}]}, ["items[1].url"]),
        ({"items": [{**VIEW, "external_id": "e" * 201}]}, ["items[0].external_id"]),
        ({"items": [{**VIEW, "visitor": "v-1"}]}, ["items[0].visitor"]),
        ({"items": [{**VIEW, "kind": 3}]}, ["items[0].kind"]),
    ],
)
async def test_a_body_of_the_wrong_shape_is_422_naming_the_field_before_the_service_is_called(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, body: dict[str, Any], fields: list[str]
) -> None:
    response = await leads_http.post(PATH, json=body, headers=leads_auth("marketing"))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == fields
    assert leads.calls == []


async def test_a_request_is_on_the_audit_trail_once_with_its_counts(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads_trail: Any
) -> None:
    items = [VIEW, {**VIEW, "external_id": "evt-2"}, {**VIEW, "kind": "tv", "external_id": "evt-3"}]
    await leads_http.post(PATH, json={"items": items}, headers=leads_auth("marketing"))
    await leads_http.post(PATH, json={"items": items[:1]}, headers=leads_auth("marketing"))

    assert await leads_trail() == [
        ("record_engagements", "allowed", "", "1 engagements: 0 recorded, 1 duplicate, 0 rejected"),
        ("record_engagements", "allowed", "", "3 engagements: 2 recorded, 0 duplicate, 1 rejected"),
    ]


async def test_a_scoring_rule_takes_an_engagement_condition(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements
) -> None:
    rule = {
        "name": "product page",
        "engagement_kind": "page_view",
        "url_contains": "/product",
        "min_count": 3,
        "points": 30,
    }
    created = await leads_http.post("/api/v1/lead-scoring-rules", json=rule, headers=leads_auth("admin"))

    assert created.status_code == 201, created.text
    assert (created.json()["engagement_kind"], created.json()["url_contains"]) == ("page_view", "/product")
    [sent] = leads.rules
    assert (sent.engagement_kind, sent.url_contains, sent.min_count) == ("page_view", "/product", 3)

    unknown = await leads_http.post(
        "/api/v1/lead-scoring-rules", json={**rule, "engagement_kind": "tv"}, headers=leads_auth("admin")
    )
    assert unknown.status_code == 422, unknown.text
    assert [error["field"] for error in unknown.json()["errors"]] == ["engagement_kind"]
    too_long = await leads_http.post(
        "/api/v1/lead-scoring-rules", json={**rule, "url_contains": "u" * 2001}, headers=leads_auth("admin")
    )
    assert too_long.status_code == 422, too_long.text
    assert [error["field"] for error in too_long.json()["errors"]] == ["url_contains"]


def engagements_of(lead_id: str) -> str:
    return f"/api/v1/leads/{lead_id}/engagements"


@pytest.mark.parametrize(("role", "scope"), [("sales_rep", ScopeKind.OWN), ("marketing", ScopeKind.ALL)])
async def test_a_reader_of_the_lead_lists_its_engagements_a_page_at_a_time(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, role: str, scope: ScopeKind
) -> None:
    query = {"kind": "page_view", "limit": 2, "cursor": "page-1"}
    response = await leads_http.get(engagements_of("lead-1"), params=query, headers=leads_auth(role))

    assert response.status_code == 200, response.text
    assert response.json() == {
        "items": [
            {
                "id": "eng-2",
                "lead_id": "lead-1",
                "kind": "page_view",
                "url": "https://x.cn/product",
                "occurred_at": "2026-12-18T09:00:00Z",
                "external_id": "evt-2",
                "actor_id": "mkt",
                "recorded_at": "2026-12-18T09:01:00Z",
            }
        ],
        "next_cursor": "page-2",
    }
    [(request, sent_scope)] = leads.listed
    assert (request.lead_id, request.kind, request.page.limit, request.page.cursor) == (
        "lead-1",
        "page_view",
        2,
        "page-1",
    )
    assert sent_scope.kind is scope


async def test_every_kind_is_listed_when_none_is_asked_for(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements
) -> None:
    response = await leads_http.get(engagements_of("lead-1"), headers=leads_auth("analyst"))

    assert response.status_code == 200, response.text
    [(request, _)] = leads.listed
    assert (request.kind, request.page.limit, request.page.cursor) == ("", 50, "")


@pytest.mark.parametrize("query", [{"kind": "tv"}, {"kind": ""}, {"kind": "Page_View"}])
async def test_an_unknown_kind_is_422_naming_kind_before_the_service_is_called(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, query: dict[str, str]
) -> None:
    response = await leads_http.get(engagements_of("lead-1"), params=query, headers=leads_auth("marketing"))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == ["kind"]
    assert leads.listed == []


@pytest.mark.parametrize("lead_id", ["lead-2", "no-such-lead"])
async def test_a_lead_out_of_the_callers_scope_is_404_as_one_that_does_not_exist(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, lead_id: str
) -> None:
    response = await leads_http.get(engagements_of(lead_id), headers=leads_auth("sales_rep"))

    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == f"lead {lead_id} not found"


@pytest.mark.parametrize("role", ["service_agent", "finance"])
async def test_a_caller_who_may_not_read_leads_may_not_list_their_engagements(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, role: str
) -> None:
    response = await leads_http.get(engagements_of("lead-1"), headers=leads_auth(role))

    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert leads.listed == []


# Tracking links that carry the lead's address or phone (jane.doe@example.com, 13812345678), each with
# what a caller who reads those masked sees of it: no pattern over the text finds them all (percent-
# encoded twice in a redirect's target, a phone number in the query, a non-ASCII address), so the
# query string and fragment go whole.
TRACKING_LINKS = {
    "https://x.cn/p?u=jane.doe@example.com": "https://x.cn/p",
    "https://x.cn/p?u=jane.doe%40example.com": "https://x.cn/p",
    "https://x.cn/r?to=https%3A%2F%2Fx.cn%2Fp%3Fu%3Djane.doe%2540example.com": "https://x.cn/r",
    "https://x.cn/p?mobile=13812345678": "https://x.cn/p",
    "https://x.cn/p?u=简·多伊@例子.中国": "https://x.cn/p",
    "https://x.cn/p#u=jane.doe@example.com": "https://x.cn/p",
    "mailto:jane.doe@example.com": "mailto:",
    "https://x.cn/product/crm": "https://x.cn/product/crm",
}


def tracking_links() -> list[leads_pb2.Engagement]:
    return [
        leads_pb2.Engagement(id=f"eng-{n}", lead_id="lead-1", kind="email_click", url=url)
        for n, url in enumerate(TRACKING_LINKS)
    ]


@pytest.mark.parametrize(
    ("role", "shown"),
    [
        ("sales_rep", list(TRACKING_LINKS)),
        ("marketing", list(TRACKING_LINKS.values())),
        ("analyst", list(TRACKING_LINKS.values())),
    ],
)
async def test_a_url_is_shown_without_its_query_to_who_reads_the_leads_email_and_phone_masked(
    leads_http: httpx.AsyncClient, leads_auth: Any, leads: RecordingEngagements, role: str, shown: list[str]
) -> None:
    """A tracking link carries the lead's address or phone in its query, in any encoding: who sees
    the lead's email and phone masked (marketing, analysts) sees each URL's scheme, host and path
    only; a rep, who reads them in clear, sees the URL as recorded."""
    leads.page = tracking_links()
    response = await leads_http.get(engagements_of("lead-1"), headers=leads_auth(role))

    assert response.status_code == 200, response.text
    assert [item["url"] for item in response.json()["items"]] == shown


@pytest.mark.parametrize(("field", "rule"), [("phone", "masked"), ("email", "masked"), ("email", "hidden")])
async def test_one_contact_point_not_read_in_clear_is_enough_to_take_the_query_off(
    role_client: RoleClient, leads: RecordingEngagements, field: str, rule: str
) -> None:
    """A rep whose policy masks (or hides) only the lead's phone, or only its email, would read it in
    a URL's query all the same."""
    leads.page = tracking_links()
    async with serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as address:
        rep = await role_client("sales_rep", grant_fields("sales_rep", "leads", **{field: rule}), upstream=address)
        response = await rep.get(engagements_of("lead-1"))

    assert response.status_code == 200, response.text
    assert [item["url"] for item in response.json()["items"]] == list(TRACKING_LINKS.values())
