"""REST conventions every router shares (SPEC §3): money as a decimal string with its currency,
optimistic concurrency through `If-Match` / `ETag` carrying the record's version."""

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any

from crm.common.v1 import common_pb2
from crm_platform.errors import EXPECTED_VERSION_ZERO, ValidationFailed
from crm_platform.money import (
    CENT,
    MAX_AMOUNT,
    MAX_FIGURE,
    THOUSANDTH,
    THREE_DECIMAL_CURRENCIES,
    amount_text,
    parse_amount,
    parse_currency,
    places,
)
from fastapi import Header, Response
from fastapi.exceptions import RequestValidationError
from google.protobuf.message import Message
from pydantic import BaseModel, Field, ValidationInfo, field_validator

# Versions travel as protobuf int64.
_INT64_MAX = 2**63 - 1
_INT64_DIGITS = len(str(_INT64_MAX))
# An entity tag of a version: `"3"` (strong or weak), or a bare 3. [0-9], not \d: \d also
# matches digits int() refuses, such as "²".
_ENTITY_TAG = re.compile(r'(?:W/)?"([0-9]+)"|([0-9]+)')
# An amount's precision depends on its currency (crm_platform.money.minor_unit).
_AMOUNT_PLACES = (
    f"at most {places(CENT)} decimal places ({places(THOUSANDTH)} in {', '.join(sorted(THREE_DECIMAL_CURRENCIES))}; "
    "none in a currency without minor units, such as JPY or KRW)"
)


class MoneyIn(BaseModel):
    """Money as every service takes it (`crm_platform.money`), refused here before any call."""

    model_config = {"extra": "forbid"}
    # The currency first: the amount's precision depends on it (a yen has no cents).
    currency: str = Field(
        min_length=3,
        max_length=3,
        description='ISO 4217 code, e.g. "CNY"; lower case is taken and upper-cased ("cny" is CNY)',
        examples=["CNY"],
    )
    amount: str = Field(
        description=f'decimal string, e.g. "12500.00": not negative, {_AMOUNT_PLACES}, at most {MAX_AMOUNT}',
        examples=["12500.00"],
    )

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        try:
            return parse_currency(value, field="currency")
        except ValidationFailed as error:
            raise ValueError(error.errors[0].message) from None

    @field_validator("amount")
    @classmethod
    def _amount(cls, value: str, info: ValidationInfo) -> str:
        return _checked_amount(value, info, MAX_AMOUNT)

    def proto(self) -> common_pb2.Money:
        # In the currency's minor unit: "100", "100.0" and "100.00" CNY are one amount, and so one
        # request to an Idempotency-Key's fingerprint.
        return common_pb2.Money(amount=amount_text(Decimal(self.amount), self.currency), currency=self.currency)


class MoneyOut(BaseModel):
    """Money as every answer shows it (`amount` a decimal string; `***` where the caller's field
    rules mask it, the currency still shown)."""

    amount: str
    currency: str


Time = str | None  # in an answer: RFC 3339 in UTC with a `Z`; null when not set, or masked


class FigureIn(MoneyIn):
    """A company's figure (annual revenue, credit limit): up to MAX_FIGURE, as the accounts service takes it."""

    amount: str = Field(
        description=f'decimal string, e.g. "3546000000000.00": not negative, {_AMOUNT_PLACES}, at most {MAX_FIGURE}',
        examples=["3546000000000.00"],
    )

    @field_validator("amount")
    @classmethod
    def _amount(cls, value: str, info: ValidationInfo) -> str:
        return _checked_amount(value, info, MAX_FIGURE)


def _checked_amount(value: str, info: ValidationInfo, maximum: Decimal) -> str:
    # Without a valid currency (refused on its own field) the amount is checked in whole cents.
    currency = str(info.data.get("currency", ""))
    try:
        parse_amount(value, field="amount", currency=currency, maximum=maximum)
    except ValidationFailed as error:
        raise ValueError(error.errors[0].message) from None
    return value


# The two request headers of the writes, declared once (routers annotate them as `str` with ""
# as the default, or `str | None` with None; FastAPI copies a shared declaration per parameter).
IF_MATCH_HEADER = Header(
    alias="If-Match",
    description='The version the record\'s `ETag` carried (`"3"`; `W/"3"` and a bare `3` are taken too): '
    "the write is made only while it is still the record's version, else 412 with `current_version`. "
    "`*`: whatever version the existing record has; no header: unconditional. A list of versions or "
    "anything else is 422 naming `If-Match`.",
)
IDEMPOTENCY_KEY_HEADER = Header(
    alias="Idempotency-Key",
    max_length=200,
    description="Names this request (up to 200 characters), so it may be retried safely: a retry under "
    "the same key answers with the first request's result and does nothing again; the key sent with "
    "another request is 422 naming `Idempotency-Key`. Keys are kept a day "
    "(`CRM_<SERVICE>_IDEMPOTENCY_RETENTION_HOURS`).",
)
IfMatch = Annotated[str, IF_MATCH_HEADER]
IdempotencyKey = Annotated[str, IDEMPOTENCY_KEY_HEADER]


def expected_version(if_match: str | None) -> int:
    """The `expected_version` a write sends its service for the request's `If-Match` header; the
    services write only when it is the record's current version, or when it is 0 (unconditional).

    - absent → 0: unconditional;
    - `*` → 0: "any current version" (RFC 9110 §13.1.1). The records these writes change must exist
      (404 otherwise), which is all `*` asks; the custom field PUT, an upsert, checks it itself;
    - `"3"` (also `W/"3"`, or a bare 3: what the `ETag` carried) → 3; a stale one answers 412 with
      the record's `current_version`. `"0"` → `EXPECTED_VERSION_ZERO`, as 0 would be unconditional.
      The weak form is taken although If-Match compares strongly
      (RFC 9110 §13.1.1): a compressing proxy (nginx with gzip) weakens the strong ETags we send, and
      a client echoing what it got must not be refused for the proxy's doing;
    - a list (`"1", "2"`) → 422 naming `If-Match`: a service compares one version, and matching any
      of several would take a read before the write that could be stale by the time it writes;
    - anything else (not a version in ASCII digits, beyond int64) → 422 naming `If-Match`, like
      the other malformed headers (FastAPI's header validation names them the same way).
    """
    if not if_match or not if_match.strip():
        return 0
    text = if_match.strip()
    if text == "*":
        return 0
    if "," in text:
        raise _bad_if_match(if_match, "send one version: a list of entity tags is not supported")
    match = _ENTITY_TAG.fullmatch(text)
    # The length first: int() refuses to read more than 4300 digits at all.
    digits = (match.group(1) or match.group(2)) if match else ""
    if not digits or len(digits) > _INT64_DIGITS or int(digits) > _INT64_MAX:
        raise _bad_if_match(if_match, 'must be the version an ETag carried, such as "3", or *')
    return int(digits) or EXPECTED_VERSION_ZERO


def _bad_if_match(if_match: str, message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("header", "If-Match"), "msg": message, "input": if_match}]
    )


def nothing_to_change() -> RequestValidationError:
    """The 422 of a PATCH whose body names no field to change (`{}`)."""
    return RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": "names no field to change"}])


def before_write(reply: Message, to_json: Callable[[Any], dict[str, Any]], after: dict[str, Any]) -> dict[str, Any]:
    """A record as it was before a write, for the audit row: the `previous` the service answers, read
    under the record's row lock in the write's transaction (no other write came between). Without
    one, the write repeated an Idempotency-Key's earlier result, which changed nothing and is audited
    as a replay: the record as it is now."""
    return to_json(getattr(reply, "previous")) if reply.HasField("previous") else after  # noqa: B009 (any write response)


def with_etag(response: Response, body: dict[str, Any]) -> dict[str, Any]:
    """Sets `ETag` to the record's version, which a later `If-Match` sends back."""
    response.headers["ETag"] = f'"{body.get("version", 0)}"'
    return body
