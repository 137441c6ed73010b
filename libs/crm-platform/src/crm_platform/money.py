"""Money as Decimal plus an ISO 4217 currency; never a float anywhere in the path."""

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from crm.common.v1 import common_pb2

from crm_platform.errors import FieldError, ValidationFailed

CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Money:
    amount: Decimal
    currency: str

    def __add__(self, other: "Money") -> "Money":
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: "Money") -> "Money":
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def _same_currency(self, other: "Money") -> None:
        if other.currency != self.currency:
            raise ValueError(f"currency mismatch: {self.currency} and {other.currency}")

    def to_proto(self) -> common_pb2.Money:
        return common_pb2.Money(amount=format(self.amount, "f"), currency=self.currency)


def parse_decimal(text: str, *, field: str) -> Decimal:
    """A finite decimal from its string form, or a validation error naming the field."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValidationFailed([FieldError(field, f"{text!r} is not a decimal number")]) from None
    if not value.is_finite():
        raise ValidationFailed([FieldError(field, "must be a finite number")])
    return value


def parse_currency(text: str, *, field: str) -> str:
    code = text.strip().upper()
    if len(code) != 3 or not code.isalpha():
        raise ValidationFailed([FieldError(field, f"{text!r} is not an ISO 4217 currency code")])
    return code


def money_from_proto(message: common_pb2.Money, *, field: str) -> Money:
    return Money(
        parse_decimal(message.amount, field=f"{field}.amount"),
        parse_currency(message.currency, field=f"{field}.currency"),
    )
