"""Bulk import parsing (pure): streamed CSV/JSON Lines/JSON into numbered rows of lead input.

The file arrives in chunks. CSV records are cut only at line ends outside quoted fields (read as
Python's csv reads them), so a quoted field may span lines and chunks; JSON Lines records are cut at
every line end. Rows are numbered from 1 (the CSV header is not a row; a blank line is not a row).
"""

import codecs
import csv
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from crm_platform.errors import FieldError, ValidationFailed, field_path
from crm_platform.lead_import import IMPORTABLE_FIELDS, column_target, custom_key
from crm_platform.structs import unstorable_values

from leads import domain

FORMATS = ("csv", "json", "jsonl")
IMPORT_STATUSES = ("running", "completed", "failed")
LEAD_FIELDS = IMPORTABLE_FIELDS
UNCLOSED_QUOTE = (
    "has a quoted field that is not closed before the end of the file; the lines after its opening quote are "
    "read as part of it: close the quote, or remove it"
)
# What a JSON value nested deeper than the parser can go (RecursionError) is refused as.
NESTED_TOO_DEEP = "its arrays or objects nest too deep to read"


def check_import_size(bytes_seen: int, max_bytes: int) -> None:
    """422 on `file` when an import's bytes (so far, or with the part about to come) pass its limit."""
    if bytes_seen > max_bytes:
        raise ValidationFailed([FieldError("file", f"the import is larger than {max_bytes} bytes")])


class RowsDigest:
    """A running SHA-256 of rows as the parser yields them (number and content), in file order:
    two reads of a part that agree on it at a row read the same rows up to that row."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, number: int, item: Mapping[str, Any] | str) -> None:
        self._hash.update(f"{number}\x1e{_row_text(item)}\x1d".encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _row_text(item: Mapping[str, Any] | str) -> str:
    """A row as text for its digest: a rejection's reason; a CSV row's columns and cells joined
    (a few times cheaper than JSON, and these run for every row); another row as JSON."""
    if isinstance(item, str):
        return item
    try:
        return "\x1f".join((*item, *item.values()))
    except TypeError:  # a value that is not text
        return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


def why_unstorable(value: Any, what: str) -> str | None:
    """Why a parsed row (or header) cannot be stored, naming the first offending place
    (`crm_platform.structs.unstorable_values`), or None."""
    for loc, problem in unstorable_values(value):
        return f"{what} field {field_path(loc)} {problem}" if loc else f"{what} {problem}"
    return None


def _as_text(value: Any) -> Any:
    """A JSON number as the text it was written as (a phone or an id); other values as they are,
    so that the checks reject what is not text, naming the field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 13800138000.0 (a spreadsheet export) is the phone 13800138000
    if isinstance(value, int | float):
        return str(value)
    return value


@dataclass(slots=True)
class RowMapper:
    """Turns one file record into lead input: mapped columns to fields, the rest into `custom`."""

    column_map: Mapping[str, str]
    source_map: Mapping[str, str]
    default_source: str = "import"
    campaign_id: str = ""
    _targets: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        errors = [
            FieldError(f"column_map.{column}", f"{target!r} is not an importable lead field")
            for column, target in self.column_map.items()
            if target not in LEAD_FIELDS
        ]
        errors += [
            FieldError(f"source_map.{value}", f"{target!r} is not one of {', '.join(domain.SOURCES)}")
            for value, target in self.source_map.items()
            if target not in domain.SOURCES
        ]
        if self.default_source not in domain.SOURCES:
            errors.append(
                FieldError("default_source", f"{self.default_source!r} is not one of {', '.join(domain.SOURCES)}")
            )
        if errors:
            raise ValidationFailed(errors)

    def target(self, column: str) -> str:
        """The lead field a column feeds, or '' for `custom`."""
        return self._route(column)[0]

    def _route(self, column: str) -> tuple[str, str]:
        """(lead field or '', custom key): decided once per column name."""
        cached = self._targets.get(column)
        if cached is None:
            cached = (column_target(column, self.column_map), custom_key(column))
            self._targets[column] = cached
        return cached

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        routes = self._targets  # per row and column: a dict lookup, no call
        for column, value in record.items():
            if value is None or value == "":
                continue
            if column == "custom" and isinstance(value, Mapping):  # a JSON row in the shape of POST /leads
                custom.update(value)
                continue
            target, key = routes.get(column) or self._route(column)
            if not target:
                custom[key] = value
                continue
            if target in data:  # two columns of the row feed one field (`mobile` and `手机`): which one?
                raise ValidationFailed([FieldError(target, self._both(record, target, column))])
            if target == "tags":
                data["tags"] = value.split(";") if isinstance(value, str) else value
            else:
                data[target] = _as_text(value)
        given_source = data.get("source", "")
        if isinstance(given_source, str):  # anything else is left for the checks to reject, naming the field
            data["source"], data["source_detail"] = domain.map_source(
                given_source, self.source_map, self.default_source
            )
        if self.campaign_id and not data.get("campaign_id"):
            data["campaign_id"] = self.campaign_id
        if custom:
            data["custom"] = custom
        return data

    def _both(self, record: Mapping[str, Any], target: str, column: str) -> str:
        first = next(c for c, v in record.items() if v not in (None, "") and self.target(c) == target)
        return f"is given twice, by columns {first!r} and {column!r}; map one of them with column_map"


def _csv_rows(records: list[str]) -> Iterator[list[str] | csv.Error]:
    """Each record's cells, or the error csv reading it raised: all records in one reader while
    they read, and record by record once one does not, so the error spoils that one only."""
    try:
        rows = list(csv.reader(records))
    except csv.Error:
        for record in records:
            try:
                yield next(csv.reader((record,)), [])
            except csv.Error as error:
                yield error
        return
    yield from rows


def _ends_in_quotes(line: str, in_quotes: bool) -> bool:
    """Whether a CSV record is still inside a quoted field at the end of `line`, read as Python's
    csv reader reads it: a quote opens a field only at the field's start; inside an unquoted field
    it is a literal character; inside a quoted field "" is a quote and a lone quote closes it."""
    at_start = not in_quotes  # a line continuing a quoted field is inside it
    closed = False  # just after a closing quote (a second quote there is an escaped one)
    for char in line:
        if in_quotes:
            if char == '"':
                in_quotes, closed = False, True
            continue
        if closed and char == '"':
            in_quotes, closed = True, False
            continue
        closed = False
        if char == ",":
            at_start = True
        elif char == '"' and at_start:
            in_quotes, at_start = True, False
        else:
            at_start = False
    return in_quotes


class RecordSplitter:
    """Cuts decoded text into complete records: CSV (`quoted`) ends a record at a newline outside
    a quoted field; JSON Lines at every newline (a newline in a JSON value is written \\n)."""

    def __init__(self, pending: bytes = b"", *, first: bool = True, quoted: bool = True) -> None:
        # Only the file's first bytes may carry a byte-order mark.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig" if first else "utf-8")()
        self._pending = self._decoder.decode(pending)
        self._quoted = quoted

    @property
    def pending(self) -> bytes:
        """The bytes after the last complete record, including a character cut by the chunk end."""
        buffered, _flag = self._decoder.getstate()
        return self._pending.encode() + buffered

    def feed(self, chunk: bytes) -> list[str]:
        text = self._pending + self._decoder.decode(chunk)
        records: list[str] = []
        start = 0
        in_quotes = False
        scan = 0
        while True:
            end = text.find("\n", scan)
            if end < 0:
                break
            if self._quoted and (in_quotes or text.find('"', scan, end) >= 0):
                in_quotes = _ends_in_quotes(text[scan:end], in_quotes)  # only lines with quotes are walked
            scan = end + 1
            if not in_quotes:
                records.append(text[start:end].rstrip("\r"))
                start = scan
        self._pending = text[start:]
        return records

    def finish(self) -> list[str]:
        tail = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return [tail.rstrip("\r\n")] if tail.strip() else []


@dataclass(slots=True)
class ParserState:
    """Where a multi-part import stopped: the next part continues from here."""

    rows: int = 0
    bytes_seen: int = 0
    header: list[str] | None = None
    pending: bytes = b""


class StreamParser:
    """Feeds chunks, yields (row number, record dict or an error text) in file order.

    A file may arrive in several parts (requests); `state` after one part restores the parser
    for the next, so rows keep their numbers and a record cut between parts is completed.
    """

    def __init__(self, fmt: str, max_bytes: int, state: ParserState | None = None) -> None:
        if fmt not in FORMATS:
            raise ValidationFailed([FieldError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")])
        state = state or ParserState()
        self.format = fmt
        self.max_bytes = max_bytes
        self.bytes_seen = state.bytes_seen
        self.rows = state.rows
        self._splitter = RecordSplitter(state.pending, first=state.bytes_seen == 0, quoted=fmt == "csv")
        self._header: list[str] | None = state.header
        self._json_parts: list[bytes] = []

    @property
    def state(self) -> ParserState:
        return ParserState(
            rows=self.rows, bytes_seen=self.bytes_seen, header=self._header, pending=self._splitter.pending
        )

    def feed(self, chunk: bytes) -> Iterator[tuple[int, dict[str, Any] | str]]:
        self.bytes_seen += len(chunk)
        check_import_size(self.bytes_seen, self.max_bytes)
        if self.format == "json":
            self._json_parts.append(chunk)  # a JSON array is only complete at its end
            return iter(())
        try:
            records = self._splitter.feed(chunk)
        except UnicodeDecodeError as error:
            raise ValidationFailed([FieldError("file", f"is not UTF-8 text: {error.reason}")]) from None
        return self._records(records)

    def finish(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        if self.format == "csv":
            yield from self._finish_csv()
            return
        if self.format == "jsonl":
            yield from self._records(self._splitter.finish())
            return
        try:
            items = json.loads(b"".join(self._json_parts).decode("utf-8-sig") or "[]")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValidationFailed([FieldError("file", f"not a JSON array: {error}")]) from None
        except RecursionError:
            raise ValidationFailed([FieldError("file", f"not a JSON array: {NESTED_TOO_DEEP}")]) from None
        if not isinstance(items, list):
            raise ValidationFailed([FieldError("file", "a JSON import is an array of objects")])
        for item in items:
            self.rows += 1
            yield self.rows, self._checked(item)

    def _finish_csv(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        """The last record, and 422 for a file without a header row (an empty one too). A last
        record still inside a quoted field is rejected: read as csv reads it, the quote would take
        every line after it into one cell, silently (a stray quote opening a later row's last cell)."""
        tail = self._splitter.finish()
        if tail and _ends_in_quotes(tail[0], in_quotes=False):
            if self._header is None:
                raise ValidationFailed([FieldError("file", f"the CSV header row {UNCLOSED_QUOTE}")])
            self.rows += 1
            yield self.rows, UNCLOSED_QUOTE
            return
        yield from self._records(tail)
        if self._header is None:
            raise ValidationFailed([FieldError("file", "the CSV file has no header row")])

    def _records(self, records: list[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
        if self.format == "jsonl":
            for line in records:
                if not line.strip():
                    continue
                self.rows += 1
                try:
                    item = json.loads(line)
                except ValueError as error:
                    yield self.rows, f"not valid JSON: {error}"
                    continue
                except RecursionError:
                    yield self.rows, f"not valid JSON: {NESTED_TOO_DEEP}"
                    continue
                yield self.rows, self._checked(item)
            return
        for read in _csv_rows(records):
            if isinstance(read, csv.Error):
                if self._header is None:
                    raise ValidationFailed([FieldError("file", f"the CSV header row {_csv_problem(read)}")])
                self.rows += 1
                yield self.rows, _csv_problem(read)
                continue
            values = read
            if self._header is None:
                self._header = _checked_header(values)
                continue
            if not values:
                continue  # a blank line is not a row
            self.rows += 1
            if not "".join(values).strip():
                continue  # a row of empty cells (a spreadsheet's blank row) is no lead; its number is kept
            if len(values) != len(self._header):
                yield self.rows, f"has {len(values)} columns, the header has {len(self._header)}"
                continue
            yield self.rows, self._checked(dict(zip(self._header, values, strict=True)))

    @staticmethod
    def _checked(item: Any) -> dict[str, Any] | str:
        """The record, or why it is rejected."""
        if not isinstance(item, dict):
            return "the row is not a JSON object"
        return why_unstorable(item, "the row") or item


def _csv_problem(error: csv.Error) -> str:
    """Why csv could not read a record, for the row's rejection."""
    if "field limit" in str(error):
        return f"has a field longer than {csv.field_size_limit()} characters"
    if "new-line character" in str(error):
        return (
            "has a carriage return outside quotes: quote a value that holds a line break "
            "(a file with the line ends of classic Mac OS must be saved with LF or CRLF line ends)"
        )
    return f"is not valid CSV: {error}"


def _checked_header(values: list[str]) -> list[str]:
    """The CSV header's column names, or 422 on `file`: no header, text PostgreSQL cannot store, or
    two columns whose values would land in the same place (one would silently overwrite the other)."""
    if not values or not any(v.strip() for v in values):
        raise ValidationFailed([FieldError("file", "the CSV file has no header row")])
    problem = why_unstorable(values, "the CSV header row")
    if problem:
        raise ValidationFailed([FieldError("file", problem)])
    header = [v.strip() for v in values]
    seen: dict[str, str] = {}
    for name in header:
        key = custom_key(name)
        if key in seen:
            first = seen[key]
            which = f"column {name!r} appears twice" if first == name else f"columns {first!r} and {name!r} collide"
            raise ValidationFailed([FieldError("file", f"the CSV header row: {which}; rename one")])
        seen[key] = name
    return header
