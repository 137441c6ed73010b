"""Money as Decimal plus an ISO 4217 currency; never a float anywhere in the path."""

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from crm.common.v1 import common_pb2

from crm_platform.errors import FieldError, ValidationFailed

CENT = Decimal("0.01")
# What the API accepts: whole cents (stored amounts may carry 4 places, as computed ones do).
AMOUNT_PLACES = 2
# Money columns are NUMERIC(20, 4) (accounts, sales, analytics) or NUMERIC(18, 2) (campaign costs):
# 16 digits before the point. An amount has at most 12, so sums of many of them fit too.
MAX_AMOUNT = Decimal("999999999999.99")
# A company's figures (annual revenue, credit limit) are not summed with others: up to what the
# columns hold. More than a dozen Chinese groups report revenue above 1,000,000,000,000 CNY.
MAX_FIGURE = Decimal("999999999999999.99")

# ISO 4217 List One (currency and fund codes in use): Debian's iso-codes 4.15 (iso_4217.json), with
# the amendments since: ZWG for ZWL (2024), XCG for ANG (2025), and HRK (2023, the euro), SLL (2024,
# the new leone SLE) and BGN (2026, the euro) withdrawn. Without the codes that price nothing: the
# precious metals (XAG, XAU, XPD, XPT), bond market units (XBA to XBD), testing (XTS), none (XXX).
# fmt: off
ISO_4217_CURRENCIES = frozenset({
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BHD", "BIF", "BMD", "BND",
    "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY",
    "COP", "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD",
    "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK",
    "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR",
    "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS",
    "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH",
    "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XDR",
    "XOF", "XPF", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG",
})
# fmt: on


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


def check_amount(
    value: Decimal, *, field: str, allow_zero: bool = True, maximum: Decimal = MAX_AMOUNT
) -> list[FieldError]:
    """What is wrong with a money amount (a finite decimal), at most one error: its sign, its size
    (MAX_AMOUNT, or MAX_FIGURE for a company's figures) or its precision (whole cents)."""
    if value <= 0 and not allow_zero:
        return [FieldError(field, "must be greater than zero")]
    if value < 0:
        return [FieldError(field, "must not be negative")]
    if value > maximum:
        return [FieldError(field, f"must not exceed {maximum}")]
    if value != value.quantize(CENT):  # in range: quantize cannot overflow the decimal context
        return [FieldError(field, f"at most {AMOUNT_PLACES} decimal places")]
    return []


def parse_amount(text: str, *, field: str, allow_zero: bool = True, maximum: Decimal = MAX_AMOUNT) -> Decimal:
    """A money amount from its string form, or a validation error naming the field."""
    value = parse_decimal(text, field=field)
    errors = check_amount(value, field=field, allow_zero=allow_zero, maximum=maximum)
    if errors:
        raise ValidationFailed(errors)
    return value


# Taken besides ISO 4217: CNH, offshore renminbi (Hong Kong banks, trade finance), which trades at
# its own rate against CNY. RMB is not a code: it is refused with a hint.
CURRENCIES = ISO_4217_CURRENCIES | {"CNH"}


def parse_currency(text: str, *, field: str) -> str:
    """A currency code of CURRENCIES, upper-cased: `cny` is CNY."""
    code = text.strip().upper()
    if code not in CURRENCIES:
        hint = " (the renminbi is CNY, or CNH offshore)" if code == "RMB" else ""
        raise ValidationFailed([FieldError(field, f"{text!r} is not an ISO 4217 currency code{hint}")])
    return code


def money_from_proto(message: common_pb2.Money, *, field: str) -> Money:
    return Money(
        parse_decimal(message.amount, field=f"{field}.amount"),
        parse_currency(message.currency, field=f"{field}.currency"),
    )
