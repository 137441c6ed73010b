"""A report's route answers JSON, or with `?format=csv` the same rows as CSV (SPEC §8: CSV export of
any report is a permissioned, audited action): the resource's `export` action, whose record scope
and field rules the rows are read with (`report_access`), the export rate limit and an audit row
naming the report and its filters."""

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gateway.security import Access
from gateway.security.exports import csv_line
from gateway.security.problems import rate_limited

Format = Annotated[Literal["json", "csv"], Query(description="csv needs the export permission")]


def report_access(access: Access, format: str) -> Access:
    """What a report route reads its rows with: for JSON the caller's read (`access`); for CSV their
    export of the resource (403 without it, audited as a refused export by the route's `require`),
    rate limited with the other exports, as `/exports/{resource}` reads: the export grant's record
    scope goes to the service and its rules show the rows, so a CSV holds no more than that grant
    covers, however widely the caller reads. Call it before the service call."""
    if format == "json":
        return access
    access.ensure("export")
    wait = access.runtime.export_limiter.acquire(f"{access.principal.kind}:{access.principal.user_id}")
    if wait:
        raise rate_limited(wait, "export rate limit exceeded")
    return access.require_view(access.resource, "export")


async def report_answer(
    request: Request,
    access: Access,
    report: str,
    body: dict[str, Any],
    rows: Iterable[Mapping[str, Any]],
    filters: str,
    next_cursor: str = "",
) -> Any:
    """`body` as JSON when read with the caller's read, or `rows` as CSV when read with their export
    (`report_access`), with an audit row (`filters` describes what was asked). A paged report's
    CSV is one page; its `Link: <...>; rel="next"` names the next (RFC 8288)."""
    if access.action != "export":
        return body
    table = [flat_row(row) for row in rows]
    columns = list(table[0]) if table else []
    await access.audit("export", report, fields=columns, reason=f"report {report}; filters: {filters}")

    async def lines() -> AsyncIterator[str]:
        yield csv_line(columns)
        for row in table:
            yield csv_line(row.get(column) for column in columns)

    headers = {"Content-Disposition": f'attachment; filename="{report}.csv"'}
    if next_cursor:
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8", headers=headers)


def query_described(request: Request) -> str:
    """The filters of a report route's request as its audit row tells them."""
    return (
        ", ".join(f"{name}={value}" for name, value in request.query_params.multi_items() if name != "format") or "none"
    )


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: lists of reasons joined, nested records other than Money flattened."""
    flat: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, list):
            flat[name] = "; ".join(_reason_text(item) if isinstance(item, Mapping) else str(item) for item in value)
        else:
            flat[name] = value
    return flat


def _reason_text(reason: Mapping[str, Any]) -> str:
    """`CODE: detail`, or the code alone where the detail is withheld."""
    return f"{reason['code']}: {reason['detail']}" if "detail" in reason else str(reason["code"])


def json_or_csv(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 answer of a report route: `model` as JSON (documentation only, nothing validated), or CSV.
    The routes set `response_model=None`: their `Any` return annotation would add a title beside the `$ref`."""
    return {
        200: {
            "model": model,
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "JSON, or CSV with format=csv",
        }
    }
