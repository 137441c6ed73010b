"""Custom fields (字段自定义): definitions and the validation of the values written under `custom`.

Pure and typed, shared by every service that owns entities with custom fields (lead, account,
contact, opportunity, ticket). A service stores its definitions, then on every write:

    errors = validate(definitions, values, partial=is_update)   # list[FieldError], field "custom.<key>"
    if errors: raise ValidationFailed(errors)
    stored = coerce(definitions, values)                         # canonical JSON-able values

and for list filters `parse_filter(definition, text)` turns a query-string value into the stored form
(crm_platform.custom_field_filters builds the typed filters and their SQL from it). Values that come
as text (an import's CSV cells, a web form's fields) are read by their field's type first, as a
filter's text is (`from_text`, `typed_texts`): the cell `12` of a number field is the number 12.
"""

import math
import re
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from urllib.parse import urlparse

from crm_platform.errors import FieldError

ENTITIES = ("lead", "account", "contact", "opportunity", "ticket")
KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_TEXT = 4000
# The definitions tables hold labels in VARCHAR(200): a longer one is a 422, not a database error.
MAX_LABEL = 200
# The largest integer every double (a Struct's only number) holds exactly, and so do all below it.
MAX_EXACT_INTEGER = 2**53

JsonValue = str | int | float | bool | list[str] | None


class FieldType(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    DECIMAL = "decimal"
    DATE = "date"
    BOOL = "bool"
    ENUM = "enum"
    MULTI_ENUM = "multi_enum"
    EMAIL = "email"
    PHONE = "phone"
    URL = "url"


@dataclass(frozen=True, slots=True)
class FieldDefinition:
    entity: str
    key: str
    label: str
    type: FieldType
    required: bool = False
    options: tuple[str, ...] = ()
    # Personal data: the gateway masks it like phone and email.
    pii: bool = False
    version: int = 1


def check_definition(entity: str, key: str, label: str, type_name: str, options: Iterable[str]) -> list[FieldError]:
    """Errors in a definition itself (before it is stored)."""
    errors: list[FieldError] = []
    if entity not in ENTITIES:
        errors.append(FieldError("entity", f"must be one of {', '.join(ENTITIES)}"))
    if not KEY_PATTERN.fullmatch(key):  # fullmatch: `$` alone also matches before a final "\n"
        errors.append(FieldError("key", "must be lower-case letters, digits and _ starting with a letter"))
    if not label.strip():
        errors.append(FieldError("label", "is required"))
    elif len(label.strip()) > MAX_LABEL:
        errors.append(FieldError("label", f"must be at most {MAX_LABEL} characters"))
    elif _has_control(label):
        errors.append(FieldError("label", "must not contain control characters"))
    try:
        kind = FieldType(type_name)
    except ValueError:
        errors.append(FieldError("type", f"must be one of {', '.join(t.value for t in FieldType)}"))
        return errors
    opts = list(options)
    if kind in (FieldType.ENUM, FieldType.MULTI_ENUM):
        if not opts:
            errors.append(FieldError("options", f"a {kind.value} field needs at least one option"))
        elif len(set(opts)) != len(opts) or any(not o.strip() for o in opts):
            errors.append(FieldError("options", "options must be non-empty and unique"))
        elif any(_has_control(o) for o in opts):
            errors.append(FieldError("options", "options must not contain control characters"))
    elif opts:
        errors.append(FieldError("options", f"a {kind.value} field takes no options"))
    return errors


def validate(
    definitions: Iterable[FieldDefinition],
    values: Mapping[str, object],
    *,
    partial: bool = False,
    prefix: str = "custom",
) -> list[FieldError]:
    """Every problem with `values`; each error names `<prefix>.<key>`.

    `partial` is for updates that write only some keys: absent required fields are not errors there,
    but setting a required field to null/empty is.
    """
    by_key = {d.key: d for d in definitions}
    errors: list[FieldError] = []
    for key, value in values.items():
        definition = by_key.get(key)
        name = f"{prefix}.{key}"
        if definition is None:
            errors.append(FieldError(name, "is not a defined custom field"))
            continue
        if _is_empty(value):
            if definition.required:
                errors.append(FieldError(name, "is required"))
            continue
        message = _check_value(definition, value)
        if message:
            errors.append(FieldError(name, message))
    if not partial:
        for definition in by_key.values():
            if definition.required and definition.key not in values:
                errors.append(FieldError(f"{prefix}.{definition.key}", "is required"))
    return errors


def coerce(definitions: Iterable[FieldDefinition], values: Mapping[str, object]) -> dict[str, JsonValue]:
    """Canonical stored form of already validated values (empty values are dropped)."""
    by_key = {d.key: d for d in definitions}
    result: dict[str, JsonValue] = {}
    for key, value in values.items():
        if _is_empty(value):
            continue
        result[key] = _canonical(by_key[key], value)
    return result


def parse_filter(definition: FieldDefinition, text: str) -> JsonValue:
    """A filter value from a query string in the stored form; ValueError with a reason if malformed."""
    match definition.type:
        case FieldType.NUMBER | FieldType.BOOL:
            return from_text(definition, text)
        case FieldType.MULTI_ENUM | FieldType.ENUM:
            option = _option_named(definition, text)
            if option not in definition.options:
                raise ValueError(f"must be one of {', '.join(definition.options)}")
            return option
    message = _check_value(definition, text)
    if message:
        raise ValueError(message)
    return _canonical(definition, text)


def from_text(definition: FieldDefinition, text: str) -> JsonValue:
    """The value `text` stands for in the field's type, wherever a value comes as text (a filter's
    query string, a CSV cell, a web form field); ValueError with a reason if it is not one.

    A number (`12`, ` 3.5 `) or a bool (`true`/`false`, any case) is read from its text, and an
    enum's option from its name in any case (`Partner` -> `partner`), as people type it into a form
    or a spreadsheet. Every other type is written as text already, so the text is returned as it
    is, for `validate` to judge; a multi_enum too: a list has no agreed text form (a filter names
    one option, not a list).
    """
    match definition.type:
        case FieldType.NUMBER:
            try:
                number = float(text)  # surrounding blanks are allowed by float() itself
            except ValueError:
                raise ValueError(f"{text!r} is not a number") from None
            if not math.isfinite(number):  # "nan", "inf", "1e999": never stored, and not JSON
                raise ValueError("must be a finite number")
            return int(number) if number.is_integer() else number
        case FieldType.BOOL:
            word = text.strip().lower()
            if word not in ("true", "false"):
                raise ValueError("must be true or false")
            return word == "true"
        case FieldType.ENUM:
            return _option_named(definition, text)
    return text


def _option_named(definition: FieldDefinition, text: str) -> str:
    """The option `text` names: itself, else the one option equal to it in any case and without
    surrounding blanks; `text` as given when none or several are (`validate` then refuses it)."""
    if text in definition.options:
        return text
    wanted = text.strip().casefold()
    named = [option for option in definition.options if option.casefold() == wanted]
    return named[0] if len(named) == 1 else text


def typed_texts(definitions: Iterable[FieldDefinition], values: Mapping[str, object]) -> dict[str, object]:
    """`values` from a source that writes everything as text (an import, a web form), with the text
    of each defined field read by `from_text`, ready for `validate` and `coerce`.

    Text that does not read as its type, and blank text (an empty cell is no value), is kept as
    given: `validate` then refuses it, or applies `required`, naming `custom.<key>` as for any
    value. Values that are not text (a JSON import's numbers) and undefined keys are as given.
    """
    by_key = {d.key: d for d in definitions}
    result: dict[str, object] = {}
    for key, value in values.items():
        definition = by_key.get(key)
        if definition is not None and isinstance(value, str) and value.strip():
            with suppress(ValueError):  # kept as given: validate names the field
                value = from_text(definition, value)
        result[key] = value
    return result


def pii_keys(definitions: Iterable[FieldDefinition]) -> frozenset[str]:
    return frozenset(d.key for d in definitions if d.pii)


def _has_control(text: str) -> bool:
    # NUL and the other C0 controls: PostgreSQL refuses NUL in text and jsonb, and none belongs in a label.
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _check_value(definition: FieldDefinition, value: object) -> str:
    """A reason the value is invalid for the definition, or ""."""
    match definition.type:
        case FieldType.TEXT:
            if not isinstance(value, str):
                return "must be a string"
            if len(value) > MAX_TEXT:
                return f"must be at most {MAX_TEXT} characters"
        case FieldType.NUMBER:
            # JSON numbers arrive as floats through protobuf Struct; bool is an int subclass, refuse it.
            if isinstance(value, bool) or not isinstance(value, int | float):
                return "must be a number"
            if not math.isfinite(value):
                return "must be a finite number"
        case FieldType.DECIMAL:
            if isinstance(value, bool) or not isinstance(value, str | int):
                return 'must be a decimal string such as "12.50"'
            try:
                if not Decimal(str(value).strip()).is_finite():
                    return "must be a finite decimal"
            except InvalidOperation:
                return f"{value!r} is not a decimal number"
        case FieldType.DATE:
            if not isinstance(value, str):
                return "must be a date YYYY-MM-DD"
            try:
                date.fromisoformat(value.strip())
            except ValueError:
                return f"{value!r} is not a date YYYY-MM-DD"
        case FieldType.BOOL:
            if not isinstance(value, bool):
                return "must be true or false"
        case FieldType.ENUM:
            if not isinstance(value, str) or value not in definition.options:
                return f"must be one of {', '.join(definition.options)}"
        case FieldType.MULTI_ENUM:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return "must be a list of options"
            unknown = [v for v in value if v not in definition.options]
            if unknown:
                return f"unknown options {', '.join(unknown)}; allowed: {', '.join(definition.options)}"
        case FieldType.EMAIL:
            if not isinstance(value, str) or not _EMAIL.match(value.strip()):
                return "must be an email address"
        case FieldType.PHONE:
            if not isinstance(value, str):
                return "must be a phone number"
            digits = re.sub(r"\D", "", value)
            if not 5 <= len(digits) <= 20 or re.search(r"[^\d\s+\-().]", value):
                return "must be a phone number (5 to 20 digits)"
        case FieldType.URL:
            parsed = urlparse(value.strip()) if isinstance(value, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
                return "must be an http(s) URL"
    return ""


def canonical_number(value: int | float) -> int | float:
    """A number value in its stored form: an integral one within ±2**53 as an int, so `1000` reads
    back as `1000`, not `1000.0`, although every number travels as a double (google.protobuf.Struct),
    which holds integers of that range exactly; any other as a float, as a double carries it."""
    number = float(value)
    return int(number) if number.is_integer() and abs(value) <= MAX_EXACT_INTEGER else number


def _canonical(definition: FieldDefinition, value: object) -> JsonValue:
    match definition.type:
        case FieldType.NUMBER:
            assert isinstance(value, int | float)
            return canonical_number(value)
        case FieldType.DECIMAL:
            return format(Decimal(str(value).strip()), "f")
        case FieldType.DATE:
            return date.fromisoformat(str(value).strip()).isoformat()
        case FieldType.BOOL:
            return bool(value)
        case FieldType.MULTI_ENUM:
            assert isinstance(value, list)
            # Stored in the definition's order, without repeats, so equal sets compare equal.
            return [o for o in definition.options if o in value]
        case FieldType.EMAIL:
            return str(value).strip().lower()
        case _:
            return str(value).strip()
