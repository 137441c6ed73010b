"""REST conventions every router shares (SPEC §3): money as a decimal string with its currency,
optimistic concurrency through `If-Match` / `ETag` carrying the record's version."""

from decimal import Decimal, InvalidOperation
from typing import Any

from crm.common.v1 import common_pb2
from fastapi import Response
from pydantic import BaseModel, Field, field_validator

# Versions travel as protobuf int64.
_INT64_MAX = 2**63 - 1


class MoneyIn(BaseModel):
    model_config = {"extra": "forbid"}
    amount: str = Field(description='decimal string, e.g. "12500.00"', examples=["12500.00"])
    currency: str = Field(min_length=3, max_length=3, examples=["CNY"])

    @field_validator("amount")
    @classmethod
    def _decimal(cls, value: str) -> str:
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise ValueError('must be a decimal string such as "12.50"') from None
        if not number.is_finite():
            raise ValueError("must be a finite decimal")
        return value

    def proto(self) -> common_pb2.Money:
        return common_pb2.Money(amount=self.amount, currency=self.currency.upper())


def expected_version(if_match: str | None) -> int:
    """`If-Match: "3"` → 3; absent → 0 (unconditional); malformed → -1, which never matches (412)."""
    if not if_match:
        return 0
    text = if_match.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or int(text) > _INT64_MAX:
        return -1
    return int(text)


def with_etag(response: Response, body: dict[str, Any]) -> dict[str, Any]:
    """Sets `ETag` to the record's version, which a later `If-Match` sends back."""
    response.headers["ETag"] = f'"{body.get("version", 0)}"'
    return body
