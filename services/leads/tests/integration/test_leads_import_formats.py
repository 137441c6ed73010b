"""Imports of awkward files through the gRPC API on PostgreSQL: escaped quotes in JSON Lines, stray
quotes in CSV, Chinese headers, JSON number phones, and a parser error that must not leave the
import `running`."""

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from crm.leads.v1 import leads_service_pb2, leads_service_pb2_grpc
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from leads import importing

pytestmark = pytest.mark.integration

METADATA = outgoing_metadata(Principal(user_id="importer", roles=("admin",), team="ops"), RecordScope(ScopeKind.ALL))


async def send(
    stub: leads_service_pb2_grpc.LeadsServiceStub, data: bytes, fmt: str, key: str
) -> leads_service_pb2.ImportLeadsResponse:
    header = leads_service_pb2.ImportHeader(format=fmt, import_key=key)

    async def requests() -> AsyncIterator[leads_service_pb2.ImportLeadsRequest]:
        yield leads_service_pb2.ImportLeadsRequest(header=header)
        for start in range(0, len(data), 7):  # records cut anywhere
            yield leads_service_pb2.ImportLeadsRequest(chunk=data[start : start + 7])

    response: leads_service_pb2.ImportLeadsResponse = await stub.ImportLeads(requests(), metadata=METADATA)
    return response


async def test_jsonl_with_escaped_quotes_imports_every_line(stub: leads_service_pb2_grpc.LeadsServiceStub) -> None:
    lines = [
        {"name": "A", "email": "a@x.cn"},
        {"name": "B", "company": 'Acme "Global" Ltd', "email": "b@x.cn"},
        {"name": "C", "email": "c@x.cn"},
        {"name": "D", "email": "d@x.cn", "phone": 13800138000.0},
        {"name": "E", "email": "e@x.cn"},
    ]
    data = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines).encode()
    data = data.replace(b'{"name": "C"', b'not json {"name": "C"')  # a broken line is rejected alone
    response = await send(stub, data, "jsonl", "jsonl-quotes")
    progress = response.lead_import.progress
    assert response.lead_import.status == "completed"
    assert (progress.rows_seen, progress.accepted, progress.rejected) == (5, 4, 1)
    assert [(r.row, r.field) for r in response.rows if r.status == "rejected"] == [(3, "row")]
    found = await stub.ListLeads(leads_service_pb2.ListLeadsRequest(q="d@x.cn"), metadata=METADATA)
    assert found.items[0].phone == "13800138000"


async def test_csv_with_stray_quotes_chinese_headers_and_blank_rows(
    stub: leads_service_pb2_grpc.LeadsServiceStub,
) -> None:
    text = (
        "姓名,手机号码,邮箱,公司名称,备注,地址\n"
        '李雷,13800138001,li@x.cn,甲公司,27" monitor buyer,北京\n'
        ",,,,,\n"
        "韩梅梅,13800138002,han@x.cn,乙公司,x\ry,上海\n"
        "王五,13800138003,wang@x.cn,丙公司,VIP,广州\n"
    )
    response = await send(stub, text.encode(), "csv", "csv-stray")
    progress = response.lead_import.progress
    assert response.lead_import.status == "completed"
    assert (progress.rows_seen, progress.accepted, progress.rejected) == (3, 2, 1)
    rejected = [r for r in response.rows if r.status == "rejected"]
    assert [(r.row, r.field) for r in rejected] == [(3, "row")] and "carriage return" in rejected[0].reason
    li = (await stub.ListLeads(leads_service_pb2.ListLeadsRequest(q="li@x.cn"), metadata=METADATA)).items[0]
    assert (li.name, li.phone, li.company) == ("李雷", "13800138001", "甲公司")
    assert dict(li.custom) == {"备注": '27" monitor buyer', "地址": "北京"}


async def test_a_csv_header_with_a_repeated_column_is_refused_naming_it(
    stub: leads_service_pb2_grpc.LeadsServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stub, b"name,phone,phone\nLi,1,2\n", "csv", "csv-dup")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'phone'" in str(caught.value.details())


async def test_a_parser_error_fails_the_import_instead_of_leaving_it_running(
    stub: leads_service_pb2_grpc.LeadsServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(item: Any) -> Any:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(importing.StreamParser, "_checked", staticmethod(broken))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stub, b'{"name": "A"}\n', "jsonl", "broken")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    status = await stub.GetLeadImport(leads_service_pb2.GetLeadImportRequest(import_id="broken"), metadata=METADATA)
    assert status.lead_import.status == "failed" and "parser bug" in status.lead_import.error
