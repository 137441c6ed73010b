import csv
import json
from typing import Any

import pytest
from crm_platform.errors import ValidationFailed
from crm_platform.lead_import import custom_key
from crm_platform.structs import INEXACT_INTEGER, MAX_NESTING, NOT_FINITE, OUT_OF_RANGE, TOO_DEEP
from hypothesis import given
from hypothesis import strategies as st
from leads.importing import (
    NESTED_TOO_DEEP,
    UNCLOSED_QUOTE,
    RecordSplitter,
    RowMapper,
    RowsDigest,
    StreamParser,
    check_import_size,
    why_unstorable,
)

pytestmark = pytest.mark.unit

CSV = b'Name,Email,Notes\nLi,li@x.cn,"two\nlines, and ""quotes"""\nWang,wang@x.cn,plain\n'


def parse_in_chunks(data: bytes, size: int, fmt: str = "csv", max_bytes: int = 10_000) -> list[tuple[int, object]]:
    parser = StreamParser(fmt, max_bytes)
    rows: list[tuple[int, object]] = []
    for start in range(0, len(data), size):
        rows += list(parser.feed(data[start : start + size]))
    return rows + list(parser.finish())


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_csv_records_survive_any_chunking(size: int) -> None:
    rows = parse_in_chunks(CSV, size)
    assert rows == [
        (1, {"Name": "Li", "Email": "li@x.cn", "Notes": 'two\nlines, and "quotes"'}),
        (2, {"Name": "Wang", "Email": "wang@x.cn", "Notes": "plain"}),
    ]


@given(st.integers(min_value=1, max_value=len("Zhāng,北京\n".encode())))
def test_multibyte_characters_cut_between_chunks(size: int) -> None:
    data = "name,city\nZhāng,北京\n".encode()
    assert parse_in_chunks(data, size) == [(1, {"name": "Zhāng", "city": "北京"})]


def test_parser_state_carries_a_file_across_parts() -> None:
    first = StreamParser("csv", 10_000)
    cut = CSV.index(b"lines")  # inside the quoted field of row 1
    rows = list(first.feed(CSV[:cut]))
    assert rows == []
    second = StreamParser("csv", 10_000, first.state)
    rows = list(second.feed(CSV[cut:])) + list(second.finish())
    assert [n for n, _ in rows] == [1, 2]


def test_bad_rows_are_reported_not_dropped() -> None:
    rows = parse_in_chunks(b"a,b\n1,2\n3\n\n4,5,6\n", 4)
    assert rows[0] == (1, {"a": "1", "b": "2"})
    assert rows[1][0] == 2 and "columns" in str(rows[1][1])
    assert rows[2][0] == 3 and "columns" in str(rows[2][1])


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("csv", b"name,phone\nab\x00c,13800000001\nok,13800000002\n"),
        ("json", b'[{"name": "a\\u0000b"}, {"name": "ok"}]'),
        ("jsonl", b'{"name": "ok", "tags": ["x\\u0000"]}\n{"name": "ok"}\n'),
        ("jsonl", b'{"name": "a\\ud800"}\n{"name": "ok"}\n'),
    ],
)
def test_rows_with_unstorable_text_are_rejected_not_stored(fmt: str, data: bytes) -> None:
    # Regression (fuzz): a NUL character (or a lone surrogate) reached PostgreSQL -> 500 for the import.
    rows = parse_in_chunks(data, 5, fmt)
    assert rows[0][0] == 1 and isinstance(rows[0][1], str) and rows[0][1].startswith("the row ")
    assert rows[1][0] == 2 and isinstance(rows[1][1], dict)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"name": "a", "score": NaN}', f"the row field score {NOT_FINITE}"),
        (b'{"name": "a", "x": [-Infinity]}', f"the row field x[0] {NOT_FINITE}"),
        (b'{"name": "a", "x": 1e999}', f"the row field x {NOT_FINITE}"),
        (b'{"name": "a", "x": 1' + b"0" * 400 + b"}", f"the row field x {OUT_OF_RANGE}"),
        (b'{"name": "a", "x": 9007199254740993}', f"the row field x {INEXACT_INTEGER}"),
    ],
)
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_rows_with_numbers_json_does_not_have_are_rejected_with_the_reason(
    line: bytes, reason: str, fmt: str
) -> None:
    # Regression: Python's parser took NaN, Infinity and 1e999 (as Infinity); the batch then
    # failed in PostgreSQL (JSONB has no NaN) or in building the lead's event. The row alone is
    # rejected, in a JSON array too; the other rows go on.
    good = b'{"name": "ok", "x": 1.5e300}'
    data = line + b"\n" + good + b"\n" if fmt == "jsonl" else b"[" + line + b"," + good + b"]"
    assert parse_in_chunks(data, 7, fmt) == [(1, reason), (2, {"name": "ok", "x": 1.5e300})]


def test_a_json_row_nested_deeper_than_an_event_can_carry_is_rejected() -> None:
    # An event nested deeper than 100 protobuf levels cannot be read by any consumer.
    deep = '{"name": "a", "x": ' + "[" * MAX_NESTING + '"y"' + "]" * MAX_NESTING + "}"  # the row is a level
    rows = parse_in_chunks(f'{deep}\n{{"name": "b", "x": "y"}}\n'.encode(), 64, "jsonl")
    where = "x" + "[0]" * (MAX_NESTING - 1)
    assert rows == [(1, f"the row field {where} {TOO_DEEP}"), (2, {"name": "b", "x": "y"})]
    for leaf in ('"y"', "1"):
        nested = json.loads("[" * (MAX_NESTING - 1) + leaf + "]" * (MAX_NESTING - 1))
        assert why_unstorable({"x": nested}, "the row") is None


def test_json_nested_deeper_than_the_parser_goes_is_refused_not_a_crash() -> None:
    """Nesting a parser cannot follow (a RecursionError) rejects the row, or fails a JSON array file,
    saying why: never a 500."""
    deep = "[" * 5000 + "]" * 5000
    rows = parse_in_chunks(f'{deep}\n{{"name": "b"}}\n'.encode(), 4096, "jsonl", max_bytes=100_000)
    assert rows == [(1, f"not valid JSON: {NESTED_TOO_DEEP}"), (2, {"name": "b"})]
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(f'[{{"name": "a", "x": {deep}}}]'.encode(), 4096, "json", max_bytes=100_000)
    assert caught.value.errors[0].field == "file" and NESTED_TOO_DEEP in caught.value.detail


def test_a_csv_header_with_a_nul_character_fails_the_file() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(b"na\x00me,phone\nLi,1\n", 100)
    assert caught.value.errors[0].field == "file" and "NUL" in caught.value.detail


def test_a_file_with_classic_mac_line_ends_fails_the_file_saying_why() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(b"name,email\rA,a@x.cn\r", 100)
    assert caught.value.errors[0].field == "file" and "LF or CRLF line ends" in caught.value.detail


def test_json_and_jsonl() -> None:
    items = [{"name": "A"}, {"name": "B"}]
    assert parse_in_chunks(json.dumps(items).encode(), 5, "json") == [(1, items[0]), (2, items[1])]
    lines = b'{"name": "A"}\nnot json\n[1]\n'
    rows = parse_in_chunks(lines, 3, "jsonl")
    assert rows[0] == (1, {"name": "A"}) and "not valid JSON" in str(rows[1][1]) and "object" in str(rows[2][1])


def test_limits_and_formats() -> None:
    with pytest.raises(ValidationFailed) as caught:
        list(StreamParser("csv", 10).feed(b"x" * 11))
    assert caught.value.errors[0].field == "file"
    with pytest.raises(ValidationFailed):
        StreamParser("xlsx", 10)
    with pytest.raises(ValidationFailed) as bad:
        list(StreamParser("csv", 100).feed(b"a,b\n\xff\xfe,1\n"))
    assert "UTF-8" in bad.value.detail


def test_splitter_keeps_the_tail_until_finish() -> None:
    splitter = RecordSplitter()
    assert splitter.feed(b"a,b\nc,") == ["a,b"]
    assert splitter.pending == b"c,"
    assert splitter.finish() == ["c,"]


def test_row_mapper_fields_custom_and_sources() -> None:
    mapper = RowMapper(column_map={}, source_map={"Partner Y": "referral"})
    data = mapper.map({"Name": "Li", "Lead Source": "Olark Chat", "Total Visits": "5", "Empty": ""})
    assert data == {"name": "Li", "source": "website", "source_detail": "Olark Chat", "custom": {"total_visits": "5"}}
    assert mapper.map({"Lead Source": "Partner Y"})["source"] == "referral"
    explicit = RowMapper(column_map={"Prospect ID": "external_id"}, source_map={})
    assert explicit.map({"Prospect ID": "p1", "Name": "ignored as a field"}) == {
        "external_id": "p1", "source": "import", "source_detail": "", "custom": {"name": "ignored as a field"},
    }  # fmt: skip
    with pytest.raises(ValidationFailed) as caught:
        RowMapper(column_map={"X": "salary"}, source_map={"Y": "tv"})
    assert {e.field for e in caught.value.errors} == {"column_map.X", "source_map.Y"}


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_jsonl_escaped_quotes_do_not_glue_lines(size: int) -> None:
    # Regression: lines were cut by CSV quote counting; an escaped \" made the count odd and every
    # following line was glued to it and lost.
    data = b'{"name":"A"}\n{"name":"B","company":"Acme \\"Global\\" Ltd"}\n{"name":"C"}\nnot json "\n{"name":"E"}\n'
    rows = parse_in_chunks(data, size, "jsonl")
    assert rows[:3] == [(1, {"name": "A"}), (2, {"name": "B", "company": 'Acme "Global" Ltd'}), (3, {"name": "C"})]
    assert rows[3][0] == 4 and "not valid JSON" in str(rows[3][1])
    assert rows[4] == (5, {"name": "E"})


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_stray_quote_inside_an_unquoted_csv_field_is_a_literal(size: int) -> None:
    # Regression: the quote was taken as opening a field; the rest of the file became one record
    # and csv.Error escaped (HTTP 500, the import stuck `running`).
    data = b'name,notes,email\nA,27" monitor buyer,a@x.cn\nB,"quoted, ok",b@x.cn\nC,x,c@x.cn\n'
    assert parse_in_chunks(data, size) == [
        (1, {"name": "A", "notes": '27" monitor buyer', "email": "a@x.cn"}),
        (2, {"name": "B", "notes": "quoted, ok", "email": "b@x.cn"}),
        (3, {"name": "C", "notes": "x", "email": "c@x.cn"}),
    ]


def test_a_record_csv_cannot_read_rejects_that_row_only() -> None:
    huge = b"y" * (csv.field_size_limit() + 1)
    data = b"name,notes\nA,x\rz\nB," + huge + b"\nC,ok\n"
    rows = parse_in_chunks(data, 4096, max_bytes=len(data))
    assert rows[0][0] == 1 and str(rows[0][1]).startswith("has a carriage return outside quotes")
    assert rows[1] == (2, f"has a field longer than {csv.field_size_limit()} characters")
    assert rows[2] == (3, {"name": "C", "notes": "ok"})


@pytest.mark.parametrize(
    ("header", "named"),
    [
        (b"name,phone,phone", "'phone' appears twice"),
        (b"name,,", "'' appears twice"),
        (b"Notes,notes", "'Notes' and 'notes'"),
    ],
)
def test_a_csv_header_whose_columns_collide_fails_the_file(header: bytes, named: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(header + b"\nLi,1,2\n", 100)
    assert caught.value.errors[0].field == "file" and named in caught.value.detail


def test_custom_keys_keep_letters_of_any_script() -> None:
    assert custom_key("备注") == "备注" and custom_key("地址") == "地址"
    assert custom_key(" 客户　等级 ") == "客户_等级"  # NFKC: the full-width space is a space
    assert custom_key("Total Time Spent on Website") == "total_time_spent_on_website"
    assert custom_key("!!!") == "column" and len(custom_key("x" * 100)) == 63
    mapper = RowMapper(column_map={}, source_map={})
    assert mapper.map({"姓名": "李雷", "备注": "VIP", "地址": "北京"})["custom"] == {"备注": "VIP", "地址": "北京"}


def test_a_rows_custom_values_file_as_post_leads_files_them() -> None:
    """A JSON row in the shape of `POST /leads` (`"custom": {...}`), or a column named as exports
    name it (`custom.budget`), fills those custom keys, not a key named `custom` or `custom_budget`."""
    mapper = RowMapper(column_map={}, source_map={})
    assert mapper.map({"name": "Li", "custom": {"budget": 7, "tier": "gold"}})["custom"] == {
        "budget": 7,
        "tier": "gold",
    }
    assert mapper.map({"name": "Li", "custom.budget": "7", "Custom.Tier": "gold"})["custom"] == {
        "budget": "7",
        "tier": "gold",
    }


def test_chinese_headers_map_to_lead_fields() -> None:
    mapper = RowMapper(column_map={}, source_map={})
    data = mapper.map(
        {"姓名": "李雷", "手机号码": "13800138000", "电子邮箱": "li@x.cn", "公司名称": "甲公司", "职务": "经理",
         "地区": "北京", "行业": "教育", "标签": "a;b", "来源": "微信"}
    )  # fmt: skip
    assert data["name"] == "李雷" and data["phone"] == "13800138000" and data["email"] == "li@x.cn"
    assert mapper.map({" 联系电话 ": "010-12345678"})["phone"] == "010-12345678"  # trimmed header
    assert (data["company"], data["title"], data["region"], data["industry"]) == ("甲公司", "经理", "北京", "教育")
    assert data["tags"] == ["a", "b"] and data["source"] == "wechat" and "custom" not in data


def test_integral_json_floats_are_written_without_the_fraction() -> None:
    mapper = RowMapper(column_map={}, source_map={})
    assert mapper.map({"phone": 13800138000.0, "external_id": 12.5})["phone"] == "13800138000"
    assert mapper.map({"external_id": 12.5})["external_id"] == "12.5"
    assert mapper.map({"external_id": 7})["external_id"] == "7"


def test_rows_of_empty_cells_are_not_rows_and_keep_later_numbers() -> None:
    rows = parse_in_chunks(b"name,phone,email\nA,1,\n,,\n , ,\nB,2,\n", 3)
    assert rows == [(1, {"name": "A", "phone": "1", "email": ""}), (4, {"name": "B", "phone": "2", "email": ""})]


def test_two_columns_that_feed_one_field_reject_the_row_naming_both() -> None:
    mapper = RowMapper(column_map={}, source_map={})
    with pytest.raises(ValidationFailed) as caught:
        mapper.map({"name": "Zhang", "mobile": "13800138000", "手机": "13900139000"})
    assert caught.value.errors[0].field == "phone"
    assert "'mobile' and '手机'" in caught.value.errors[0].message
    # One of them empty (exports often carry both): no conflict.
    assert mapper.map({"name": "Li", "mobile": "", "手机": "13900139000"})["phone"] == "13900139000"


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_an_unclosed_quote_rejects_its_row_instead_of_taking_the_rows_after_it_into_a_cell(size: int) -> None:
    data = b'name,email,colour\nA,a@x.cn,"red\nB,b@x.cn,blue\nC,c@x.cn,green\n'
    assert parse_in_chunks(data, size) == [(1, UNCLOSED_QUOTE)]
    last = b'name,email,colour\nA,a@x.cn,red\nB,b@x.cn,"unterminated'
    assert parse_in_chunks(last, size) == [(1, {"name": "A", "email": "a@x.cn", "colour": "red"}), (2, UNCLOSED_QUOTE)]
    closed = b'name,email,colour\nA,a@x.cn,"red\nand blue"'  # closed at the very end: a cell of two lines
    assert parse_in_chunks(closed, size) == [(1, {"name": "A", "email": "a@x.cn", "colour": "red\nand blue"})]


def test_an_unclosed_quote_in_the_header_fails_the_file() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(b'name,"email\nA,a@x.cn\n', 5)
    assert caught.value.errors[0].field == "file" and "header row" in caught.value.detail
    assert "not closed" in caught.value.detail


@pytest.mark.parametrize("data", [b"", b"  ", b"\xef\xbb\xbf"])
def test_an_empty_csv_file_has_no_header_row(data: bytes) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_in_chunks(data, 1)
    assert caught.value.detail == "file: the CSV file has no header row"
    assert parse_in_chunks(b"", 1, "jsonl") == []  # JSON Lines have no header: an empty file is no rows


def test_the_size_of_an_import_is_checked_against_its_limit() -> None:
    check_import_size(100, 100)
    with pytest.raises(ValidationFailed) as caught:
        check_import_size(101, 100)
    assert caught.value.detail == "file: the import is larger than 100 bytes"


def digest_of(rows: list[tuple[int, Any]]) -> str:
    digest = RowsDigest()
    for number, item in rows:
        digest.add(number, item)
    return digest.hexdigest()


def test_the_rows_digest_is_the_same_for_the_same_rows_however_the_file_is_cut() -> None:
    assert digest_of(parse_in_chunks(CSV, 1)) == digest_of(parse_in_chunks(CSV, 1000))
    jsonl = b'{"name": "A", "phone": 13800138000}\n{"name": "B", "tags": ["x"]}\nnot json\n'
    assert digest_of(parse_in_chunks(jsonl, 2, "jsonl")) == digest_of(parse_in_chunks(jsonl, 100, "jsonl"))


@pytest.mark.parametrize(
    "other",
    [
        CSV.replace(b"Wang", b"Wong"),  # another cell
        CSV.replace(b"Name,Email", b"Email,Name"),  # the same cells under other columns
        CSV.replace(b"Li,li@x.cn", b",,\nLi,li@x.cn"),  # the same rows, numbered otherwise
    ],
)
def test_the_rows_digest_tells_other_rows_apart(other: bytes) -> None:
    assert digest_of(parse_in_chunks(other, 7)) != digest_of(parse_in_chunks(CSV, 7))
    assert digest_of([(1, {"phone": 1})]) != digest_of([(1, {"phone": "1"})])
