"""What the accounts service reads from a request before any handler runs: money fields and pages."""

import base64
import json

import pytest
from accounts.repository import accounts, apply_page, parse_page
from accounts.servicer import account_values
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.common.v1 import common_pb2
from crm_platform.errors import ValidationFailed
from sqlalchemy import select

pytestmark = pytest.mark.unit


def refused_fields(error: pytest.ExceptionInfo[ValidationFailed]) -> list[str]:
    return [e.field for e in error.value.errors]


@pytest.mark.parametrize("name", ["annual_revenue", "credit_limit"])
def test_a_currency_must_be_an_iso_4217_code(name: str) -> None:
    # Any three letters passed: "ZZZ" was stored as a currency.
    message = pb.AccountInput(name="Acme")
    getattr(message, name).CopyFrom(common_pb2.Money(amount="1.00", currency="ZZZ"))
    with pytest.raises(ValidationFailed) as caught:
        account_values(message)
    assert refused_fields(caught) == [f"{name}.currency"]


def test_a_lower_case_currency_is_taken_upper_cased() -> None:
    values = account_values(pb.AccountInput(name="Acme", credit_limit=common_pb2.Money(amount="10", currency="cny")))
    assert values["credit_limit_currency"] == "CNY"


@pytest.mark.parametrize("sort", ["-", "--name", "---created_at"])
def test_a_sort_names_a_field_with_at_most_one_minus(sort: str) -> None:
    # `-` sorted by created_at and `--name` by name, while `zzz` was refused.
    with pytest.raises(ValidationFailed) as caught:
        parse_page(50, "", sort)
    assert refused_fields(caught) == ["sort"]


def test_a_sort_is_a_field_with_an_optional_minus() -> None:
    assert (parse_page(50, "", "-name").sort_field, parse_page(50, "", "-name").descending) == ("name", True)
    assert (parse_page(50, "", "name").sort_field, parse_page(50, "", "name").descending) == ("name", False)
    assert parse_page(50, "", "").sort_field == "created_at"


def test_a_cursor_is_taken_only_as_it_was_issued() -> None:
    issued = base64.urlsafe_b64encode(json.dumps({"sort": "name", "value": "Acme Ltd", "id": "a-1"}).encode()).decode()
    assert issued.endswith("=")
    apply_page(select(accounts), accounts, parse_page(50, issued, "name"))
    # Lenient base64 ignored what followed the padding: the edited cursor paged as the issued one.
    for edited in (issued + "x", issued + "AAAA", issued[:8] + "." + issued[8:]):
        with pytest.raises(ValidationFailed) as caught:
            apply_page(select(accounts), accounts, parse_page(50, edited, "name"))
        assert refused_fields(caught) == ["cursor"]


@pytest.mark.parametrize(
    ("sort", "value"), [("updated_at", 1), ("updated_at", "yesterday"), ("name", 7), ("-name", ["a"])]
)
def test_a_cursor_value_not_of_its_sort_columns_type_is_refused_on_cursor(sort: str, value: object) -> None:
    """Forged, but encoded as issued: it must not reach the database (a 500 there)."""
    payload = {"sort": sort, "value": value, "id": "a-5"}
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    page = parse_page(50, forged, sort)
    with pytest.raises(ValidationFailed) as caught:
        apply_page(select(accounts), accounts, page)
    assert refused_fields(caught) == ["cursor"]
