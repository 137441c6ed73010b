"""Saved segments leak no value the caller sees masked (SPEC §5, §9). A segment's filters pass the
checks of the account list's own query filters — when it is saved, and when a list or an export
applies it, since a team segment may have been saved by someone who reads more. Otherwise a caller
who sees a pii custom field masked (marketing) could save `custom.<key>=<guess>` and list with
`segment_id` to test guesses. Shown segments mask the values of such filters.

The real gateway app over a fake accounts service (segments, custom field definitions, accounts)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer, add_CustomFieldServiceServicer_to_server
from gateway.testing import started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "segments-secret-" + "s" * 30
TEAM = "east"
NATIONAL_ID = "110101199003077777"
# A sales manager's team segments: one on a pii custom field, one on the region, one harmless.
SEGMENTS = {
    "seg-pii": {"custom.national_id": NATIONAL_ID},
    "seg-region": {"region": "north"},
    "seg-channel": {"custom.channel": "partner", "tier": "A"},
}
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "src/gateway/security/default_policy.yaml"


@dataclass
class FakeAccounts(AccountsServiceServicer, CustomFieldServiceServicer):
    """Segments and custom field definitions of accounts; records every list, create and update it serves."""

    lists: list[pb.ListAccountsRequest] = field(default_factory=list)
    created: list[pb.CreateSegmentRequest] = field(default_factory=list)
    updated: list[pb.UpdateSegmentRequest] = field(default_factory=list)

    def segment(self, segment_id: str) -> accounts_pb2.Segment:
        return accounts_pb2.Segment(
            id=segment_id,
            name=segment_id,
            visibility="team",
            owner_id="mgr",
            team=TEAM,
            filters=SEGMENTS[segment_id],
            version=3,
        )

    async def ListCustomFields(self, request: cf_pb.ListCustomFieldsRequest, context: Any) -> Any:
        return cf_pb.ListCustomFieldsResponse(
            items=[
                cf_pb.CustomFieldDefinition(entity=request.entity, key="national_id", type="text", pii=True),
                cf_pb.CustomFieldDefinition(entity=request.entity, key="channel", type="text"),
            ]
        )

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Any) -> pb.GetSegmentResponse:
        if request.segment_id not in SEGMENTS:
            await context.abort(grpc.StatusCode.NOT_FOUND, "segment not found")
        return pb.GetSegmentResponse(segment=self.segment(request.segment_id))

    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Any) -> pb.ListSegmentsResponse:
        return pb.ListSegmentsResponse(items=[self.segment(segment_id) for segment_id in SEGMENTS])

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Any) -> pb.CreateSegmentResponse:
        self.created.append(request)
        segment = accounts_pb2.Segment(id="seg-new", name=request.name, filters=request.filters, tags=request.tags)
        return pb.CreateSegmentResponse(segment=segment)

    async def UpdateSegment(self, request: pb.UpdateSegmentRequest, context: Any) -> pb.UpdateSegmentResponse:
        self.updated.append(request)
        previous = self.segment(request.segment_id)
        segment = self.segment(request.segment_id)
        request.update_mask.MergeMessage(request.segment, segment, replace_repeated_field=True)
        segment.version = 4
        return pb.UpdateSegmentResponse(segment=segment, previous=previous)

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Any) -> pb.ListAccountsResponse:
        self.lists.append(request)
        return pb.ListAccountsResponse(page_info=common_pb2.PageInfo())


@dataclass
class Stack:
    accounts: FakeAccounts
    http: httpx.AsyncClient

    def headers(self, role: str) -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub=f"{role}-1", roles=[role], team=TEAM, region="north")
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def stack(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Stack]:
    accounts = FakeAccounts()
    server = grpc.aio.server()
    add_AccountsServiceServicer_to_server(accounts, server)
    add_CustomFieldServiceServicer_to_server(accounts, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    # The default policy, but marketing sees accounts' regions masked and may export accounts.
    def marketing_masks_regions_and_exports(policy: dict[str, Any]) -> None:
        marketing = policy["roles"]["marketing"]["grants"]["accounts"]
        marketing["fields"]["region"] = "masked"
        marketing["actions"] = ["read", "export"]

    gateway = started_gateway(
        tmp_path,
        migrated_sqlite,
        secret=SECRET,
        edits=[marketing_masks_regions_and_exports],
        accounts=f"127.0.0.1:{port}",
    )
    async with gateway as http:
        yield Stack(accounts, http)
    await server.stop(None)


def refused_field(response: httpx.Response) -> str:
    assert response.status_code == 403, response.text
    return str(response.json()["errors"][0]["field"])


async def test_saving_a_segment_on_a_field_the_caller_sees_masked_is_refused(stack: Stack) -> None:
    marketing = stack.headers("marketing")
    for filters, name in (
        ({"custom.national_id": NATIONAL_ID}, "filters.custom.national_id"),  # pii, and marketing masks pii
        ({"tier": "A", "region": "north"}, "filters.region"),  # masked by the field rules
    ):
        body = {"name": "guess", "filters": filters}
        assert refused_field(await stack.http.post("/api/v1/segments", json=body, headers=marketing)) == name
    assert stack.accounts.created == []

    allowed = {"custom.channel": "partner", "tier": "A", "tag": ["vip"]}
    saved = await stack.http.post("/api/v1/segments", json={"name": "ok", "filters": allowed}, headers=marketing)
    assert saved.status_code == 201, saved.text
    assert [dict(r.filters) for r in stack.accounts.created] == [{"custom.channel": "partner", "tier": "A"}]
    # Who reads everything in clear saves what they like.
    manager = stack.headers("sales_manager")
    pii = {"name": "ids", "filters": {"custom.national_id": NATIONAL_ID, "region": "north"}}
    assert (await stack.http.post("/api/v1/segments", json=pii, headers=manager)).status_code == 201


async def test_using_a_teammates_segment_on_such_a_field_is_refused(stack: Stack) -> None:
    marketing = stack.headers("marketing")
    for segment_id, name in (("seg-pii", "filters.custom.national_id"), ("seg-region", "filters.region")):
        for path in ("/api/v1/accounts", "/api/v1/exports/accounts"):
            response = await stack.http.get(path, params={"segment_id": segment_id}, headers=marketing)
            assert refused_field(response) == name, path
    assert stack.accounts.lists == []  # never applied

    listed = await stack.http.get("/api/v1/accounts", params={"segment_id": "seg-channel"}, headers=marketing)
    assert listed.status_code == 200, listed.text
    manager = stack.headers("sales_manager")
    for segment_id in SEGMENTS:
        response = await stack.http.get("/api/v1/accounts", params={"segment_id": segment_id}, headers=manager)
        assert response.status_code == 200, response.text
    assert [r.segment_id for r in stack.accounts.lists] == ["seg-channel", *SEGMENTS]
    missing = await stack.http.get("/api/v1/accounts", params={"segment_id": "seg-gone"}, headers=manager)
    assert missing.status_code == 404


async def test_shown_segments_mask_the_values_of_such_filters(stack: Stack) -> None:
    listed = await stack.http.get("/api/v1/segments", headers=stack.headers("marketing"))
    assert listed.status_code == 200, listed.text
    shown = {s["id"]: s["filters"] for s in listed.json()["items"]}
    assert shown["seg-pii"]["custom.national_id"] != NATIONAL_ID and NATIONAL_ID not in listed.text
    assert shown["seg-region"]["region"] != "north"
    assert shown["seg-channel"] == {"custom.channel": "partner", "tier": "A"}
    got = await stack.http.get("/api/v1/segments/seg-pii", headers=stack.headers("marketing"))
    assert got.status_code == 200 and NATIONAL_ID not in got.text

    clear = await stack.http.get("/api/v1/segments/seg-pii", headers=stack.headers("sales_manager"))
    assert clear.json()["filters"] == {"custom.national_id": NATIONAL_ID}


async def test_changing_a_segments_filters_passes_the_same_checks(stack: Stack) -> None:
    marketing = stack.headers("marketing")
    body = {"filters": {"custom.national_id": NATIONAL_ID}}
    refused = await stack.http.patch("/api/v1/segments/seg-channel", json=body, headers=marketing)
    assert refused_field(refused) == "filters.custom.national_id"
    assert stack.accounts.updated == []


async def test_a_segment_patch_writes_the_fields_sent_at_the_if_match_version(stack: Stack) -> None:
    manager = stack.headers("sales_manager")
    got = await stack.http.get("/api/v1/segments/seg-channel", headers=manager)
    assert got.headers["ETag"] == '"3"' and got.json()["version"] == 3

    body = {"shared_with_team": False, "filters": {"tier": "B", "tag": ["vip"]}}
    patched = await stack.http.patch(
        "/api/v1/segments/seg-channel", json=body, headers={**manager, "If-Match": got.headers["ETag"]}
    )
    assert patched.status_code == 200, patched.text
    assert patched.headers["ETag"] == '"4"'
    assert patched.json()["filters"] == {"tier": "B", "tag": ["vip"]}
    [sent] = stack.accounts.updated
    assert (sent.segment_id, list(sent.update_mask.paths), sent.expected_version) == (
        "seg-channel",
        ["visibility", "filters", "tags"],
        3,
    )
    assert (sent.segment.visibility, dict(sent.segment.filters), list(sent.segment.tags)) == (
        "user",
        {"tier": "B"},
        ["vip"],
    )

    for unknown in ({"owner_id": "me"}, {"version": 4}, {"name": " "}):
        response = await stack.http.patch("/api/v1/segments/seg-channel", json=unknown, headers=manager)
        assert response.status_code == 422, unknown
    assert len(stack.accounts.updated) == 1
