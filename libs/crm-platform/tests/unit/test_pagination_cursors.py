"""Keyset cursors: a cursor is taken only by the list, filters and sort it was made for, and only
when its values fit the sort column; anything else is a ValidationFailed on `cursor` (HTTP 422), never an
error of the database (HTTP 500)."""

import base64
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_service_pb2
from crm_platform.db import UtcDateTime
from crm_platform.errors import ValidationFailed
from crm_platform.pagination import (
    bind_cursor,
    decode_cursor,
    encode_cursor,
    keyset_page,
    next_cursor,
    page_fingerprint,
    parse_sort,
    unbind_cursor,
)
from sqlalchemy import Column, Date, Integer, MetaData, Numeric, String, Table, select

pytestmark = pytest.mark.unit

deals = Table(
    "deals",
    MetaData(),
    Column("id", String(36), primary_key=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("score", Integer, nullable=False),
    Column("name", String(200), nullable=False),
    Column("close_date", Date),
    Column("amount", Numeric(20, 4), nullable=False),
)
CREATED = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def raw(payload: Any) -> str:
    """A cursor holding any JSON, as a client could send it."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def page_after(cursor: str, sort: str = "created_at") -> set[Any]:
    """The values the query compares with: where the next page starts."""
    query = keyset_page(
        select(deals), sort_column=deals.c[sort], id_column=deals.c.id, descending=True, cursor=cursor, limit=10
    )
    params = query.compile().params
    return {value for name, value in params.items() if name != "param_1"}  # param_1 is the limit


def refusal(cursor: str, sort: str = "created_at") -> str:
    with pytest.raises(ValidationFailed) as caught:
        page_after(cursor, sort)
    [error] = caught.value.errors
    assert error.field == "cursor"
    return error.message


def cursor_after(sort: str, value: Any, *, descending: bool = True) -> str:
    """The cursor `next_cursor` gives after a full page whose last row has `value` in `sort`
    (descending, as `page_after` pages, unless said otherwise)."""
    rows = [SimpleNamespace(id="d-1", **{sort: value}), SimpleNamespace(id="d-2", **{sort: value})]
    return next_cursor(rows, sort_key=sort, descending=descending, limit=1)


@pytest.mark.parametrize(
    ("sort", "value"),
    [
        ("created_at", CREATED),
        ("score", 87),
        ("name", "Zoë"),
        ("close_date", date(2026, 12, 31)),
        ("close_date", None),
        ("amount", Decimal("1250.5000")),
    ],
)
def test_the_next_page_starts_after_the_last_row_in_the_sort_columns_type(sort: str, value: Any) -> None:
    assert page_after(cursor_after(sort, value), sort) == {value, "d-1"} - {None}


def test_a_cursor_of_another_sort_names_the_sort_it_belongs_to() -> None:
    # A client keeps its cursor from ?sort=score and switches to ?sort=-created_at.
    assert refusal(cursor_after("score", 87)) == "belongs to a list sorted by -score; start again without a cursor"
    # Even when the value would fit: both columns hold times.
    assert refusal(cursor_after("created_at", CREATED), "close_date").startswith("belongs to a list sorted by")


def test_a_cursor_of_the_other_direction_is_refused() -> None:
    # ?sort=score's cursor sent with ?sort=-score would page from the wrong end of the list.
    ascending = cursor_after("score", 87, descending=False)
    assert refusal(ascending, "score") == "belongs to a list sorted by score; start again without a cursor"


def test_cursors_from_before_they_named_their_sort_still_page_when_they_fit() -> None:
    assert page_after(raw(["2026-11-23 08:00:00+00:00", "d-1"])) == {CREATED, "d-1"}
    assert page_after(raw(["2026-12-31", "d-1"]), "close_date") == {date(2026, 12, 31), "d-1"}
    assert page_after(raw([None, "d-1"]), "close_date") == {"d-1"}


def test_a_time_without_offset_is_read_as_utc() -> None:
    # What SQLite's times looked like before UtcDateTime: stored, and so given, in UTC.
    assert page_after(raw(["2026-11-23 08:00:00", "d-1"])) == {CREATED, "d-1"}


@pytest.mark.parametrize(
    "payload",
    [
        [1],
        ["a", "b", "c"],
        [],
        "2026-11-23",
        {"value": "2026-11-23 08:00:00+00:00", "id": "d-1"},
        {"sort": "created_at", "value": "2026-11-23 08:00:00+00:00", "id": "d-1", "more": 1},
        {"sort": ["created_at"], "value": "2026-11-23 08:00:00+00:00", "id": "d-1"},
    ],
    ids=repr,
)
def test_a_cursor_of_another_shape_is_refused(payload: Any) -> None:
    assert refusal(raw(payload)) == "is not a cursor this API issued"


@pytest.mark.parametrize(
    "cursor",
    ["%%%not-a-cursor", base64.urlsafe_b64encode(b"[" * 5000).decode(), base64.urlsafe_b64encode(b"\xff").decode()],
    ids=["not base64", "nested too deep", "not UTF-8"],
)
def test_a_cursor_that_is_not_json_is_refused(cursor: str) -> None:
    assert refusal(cursor) == "is not a cursor this API issued"


@pytest.mark.parametrize(
    "edit",
    [
        lambda issued: issued + "x",
        lambda issued: issued + "=x",
        lambda issued: issued + "AAAA",
        lambda issued: issued + "\n",
        lambda issued: issued[:10] + "." + issued[10:],
        lambda issued: issued.rstrip("="),
    ],
    ids=["junk after it", "junk after more padding", "a block after it", "a new line", "a dot inside", "no padding"],
)
def test_a_cursor_is_taken_only_exactly_as_issued(edit: Any) -> None:
    # Lenient base64 skips what is not in its alphabet and what follows the padding: these
    # decoded to the issued cursor's own JSON and were taken.
    issued = cursor_after("created_at", CREATED)
    assert issued.endswith("=")  # the padding the edits go past
    assert page_after(issued)
    assert refusal(edit(issued)) == "is not a cursor this API issued"
    values = encode_cursor(["2026-11-23", "d-10"])
    assert values.endswith("=")
    assert decode_cursor(values) == ["2026-11-23", "d-10"]
    with pytest.raises(ValidationFailed):
        decode_cursor(edit(values))


@pytest.mark.parametrize("sort", ["-", "--", "--name", "+name", "name-", " name"])
def test_a_sort_names_one_field_with_at_most_one_minus(sort: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_sort(sort, {"name": deals.c.name}, default="-name")
    assert [e.field for e in caught.value.errors] == ["sort"]


def test_a_sort_is_ascending_or_with_one_minus_descending() -> None:
    assert parse_sort("name", {"name": deals.c.name}, default="-name") == (deals.c.name, False)
    assert parse_sort("-name", {"name": deals.c.name}, default="name") == (deals.c.name, True)
    assert parse_sort("", {"name": deals.c.name}, default="-name") == (deals.c.name, True)


@pytest.mark.parametrize(
    ("sort", "value"),
    [
        ("created_at", 1),
        ("created_at", "yesterday"),
        ("created_at", None),
        ("score", "abc"),
        ("score", True),
        ("score", 87.5),
        ("score", 2**31),
        ("name", 1),
        ("name", "nul\x00"),
        ("name", "lone \ud800 surrogate"),
        ("close_date", "2026-13-01"),
        ("close_date", 20261231),
        ("amount", 1250.5),
        ("amount", "NaN"),
        ("amount", "1e16"),
        ("amount", "1e-999999"),  # PostgreSQL's driver cannot even send it
        ("amount", "0.00001"),  # more decimals than the column holds: no row has it
        ("amount", [1]),
    ],
    ids=repr,
)
def test_a_value_that_does_not_fit_the_sort_column_is_refused(sort: str, value: Any) -> None:
    expected = "does not fit this list and sort; start again without a cursor"
    assert refusal(raw([value, "d-1"]), sort) == expected
    assert refusal(raw({"sort": f"-{sort}", "value": value, "id": "d-1"}), sort) == expected


@pytest.mark.parametrize("after_id", [7, None, ["d-1"], "d-\x00"], ids=repr)
def test_an_id_that_is_not_one_of_the_lists_ids_is_refused(after_id: Any) -> None:
    assert refusal(raw(["2026-11-23 08:00:00+00:00", after_id])).startswith("does not fit this list")


# --- cursors bound to their list and filters (the gRPC server binds every list's cursors) --------

LIST_LEADS = "/crm.leads.v1.LeadsService/ListLeads"


def list_leads(**filters: Any) -> leads_service_pb2.ListLeadsRequest:
    return leads_service_pb2.ListLeadsRequest(page=common_pb2.PageRequest(limit=50), **filters)


def test_a_bound_cursor_is_taken_back_by_the_same_list_and_filters() -> None:
    fingerprint = page_fingerprint(LIST_LEADS, list_leads(statuses=["new"], source_detail="expo"))
    bound = bind_cursor("eyJpZCI6IDF9", fingerprint)
    again = list_leads(statuses=["new"], source_detail="expo")
    again.page.cursor, again.page.limit, again.page.sort = bound, 500, "-created_at"  # the page is not a filter
    assert unbind_cursor(again.page.cursor, page_fingerprint(LIST_LEADS, again)) == "eyJpZCI6IDF9"


def test_repeated_filter_values_in_another_order_are_the_same_list() -> None:
    bound = bind_cursor("eyJpZCI6IDF9", page_fingerprint(LIST_LEADS, list_leads(statuses=["new", "contacted"])))
    again = page_fingerprint(LIST_LEADS, list_leads(statuses=["contacted", "new"]))
    assert unbind_cursor(bound, again) == "eyJpZCI6IDF9"


@pytest.mark.parametrize(
    ("method", "filters"),
    [
        (LIST_LEADS, {"statuses": ["contacted"], "source_detail": "expo"}),  # another value
        (LIST_LEADS, {"statuses": ["new"]}),  # a filter left out
        (LIST_LEADS, {"statuses": ["new"], "source_detail": "expo", "owner_id": "u1"}),  # one added
        ("/crm.leads.v1.LeadsService/ListPool", {"statuses": ["new"], "source_detail": "expo"}),  # another list
    ],
)
def test_a_cursor_of_another_list_or_other_filters_is_refused(method: str, filters: dict[str, Any]) -> None:
    bound = bind_cursor(
        "eyJpZCI6IDF9", page_fingerprint(LIST_LEADS, list_leads(statuses=["new"], source_detail="expo"))
    )
    with pytest.raises(ValidationFailed) as refused:
        unbind_cursor(bound, page_fingerprint(method, list_leads(**filters)))
    assert refused.value.errors[0].field == "cursor"
    assert "another list or other filters" in refused.value.errors[0].message


@pytest.mark.parametrize("cursor", ["eyJpZCI6IDF9", "0123456789abcdef.", ".eyJpZCI6IDF9"])
def test_an_unbound_cursor_is_not_one_this_api_issued(cursor: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        unbind_cursor(cursor, page_fingerprint(LIST_LEADS, list_leads()))
    assert refused.value.errors[0].field == "cursor"
    assert "not a cursor this API issued" in refused.value.errors[0].message


def test_the_first_and_the_last_page_have_no_cursor_to_bind() -> None:
    fingerprint = page_fingerprint(LIST_LEADS, list_leads())
    assert bind_cursor("", fingerprint) == ""
    assert unbind_cursor("", fingerprint) == ""
