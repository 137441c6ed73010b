"""Money as Decimal plus an ISO 4217 currency; never a float anywhere in the path."""

import re
from dataclasses import dataclass
from decimal import Decimal

from crm.common.v1 import common_pb2

from crm_platform.errors import FieldError, ValidationFailed

# The minor units of ISO 4217: what the API accepts is a whole number of them (stored amounts may
# carry 4 places, as computed ones do), and computed amounts are rounded to them (`minor_unit`).
CENT = Decimal("0.01")
THOUSANDTH = Decimal("0.001")
UNIT = Decimal(1)
# Money columns are NUMERIC(20, 4) (accounts, sales, analytics) or NUMERIC(18, 3) (campaign costs):
# 15 digits or more before the point. An amount has at most 12, in every currency, so sums of many
# of them fit too.
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

# ISO 4217 currencies whose minor unit is 0: a yen or a won has no cents, and an ERP refuses an
# invoice of 849.15 JPY.
# fmt: off
WHOLE_UNIT_CURRENCIES = frozenset({
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF",
    "XPF",
})
# fmt: on
# ISO 4217 currencies whose minor unit is 3 decimals: a Kuwaiti dinar has 1000 fils, an invoice of
# 12.345 KWD is an ordinary one, and rounding it to 12.35 would bill 5 fils too many. Every other
# currency has cents.
THREE_DECIMAL_CURRENCIES = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})


# An optional minus, digits, and decimals after a point: [0-9], not \d (which takes "١٢" too).
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def minor_unit(currency: str) -> Decimal:
    """The smallest amount of `currency` the API takes, shows and rounds computed amounts to."""
    if currency in WHOLE_UNIT_CURRENCIES:
        return UNIT
    if currency in THREE_DECIMAL_CURRENCIES:
        return THOUSANDTH
    return CENT


def places(unit: Decimal) -> int:
    """The decimal places of a minor unit: 2 for CENT, 3 for THOUSANDTH, 0 for UNIT."""
    return -unit.adjusted()


def amount_text(amount: Decimal, currency: str) -> str:
    """An amount as the API shows it: stored amounts carry 4 places, shown in the currency's minor unit."""
    return format(amount.quantize(minor_unit(currency)), "f")


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
    """A decimal from its string form as SPEC §3 writes money ("12500.00"), or a validation error
    naming the field. Decimal() alone also takes exponents ("1e5"), blanks, "_", "+", other scripts'
    digits, NaN and Infinity."""
    if not _DECIMAL_TEXT.fullmatch(text):
        raise ValidationFailed(
            [FieldError(field, f'{text!r} is not a decimal number written as digits, such as "12500.00"')]
        )
    return Decimal(text)


def check_amount(
    value: Decimal, *, field: str, currency: str, allow_zero: bool = True, maximum: Decimal = MAX_AMOUNT
) -> list[FieldError]:
    """What is wrong with a money amount (a finite decimal) in `currency`, at most one error: its
    sign, its size (MAX_AMOUNT, or MAX_FIGURE for a company's figures) or its precision (a whole
    number of the currency's minor unit: cents, thousandths, or whole units)."""
    if value <= 0 and not allow_zero:
        return [FieldError(field, "must be greater than zero")]
    if value < 0:
        return [FieldError(field, "must not be negative")]
    if value > maximum:
        return [FieldError(field, f"must not exceed {maximum}")]
    unit = minor_unit(currency)
    if value != value.quantize(unit):  # in range: quantize cannot overflow the decimal context
        if unit == UNIT:
            return [FieldError(field, f"{currency} has no minor unit: a whole amount, without decimal places")]
        return [FieldError(field, f"at most {places(unit)} decimal places")]
    return []


def parse_amount(
    text: str, *, field: str, currency: str, allow_zero: bool = True, maximum: Decimal = MAX_AMOUNT
) -> Decimal:
    """A money amount in `currency` from its string form, or a validation error naming the field."""
    value = parse_decimal(text, field=field)
    errors = check_amount(value, field=field, currency=currency, allow_zero=allow_zero, maximum=maximum)
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
