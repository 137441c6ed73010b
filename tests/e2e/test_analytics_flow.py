"""Analytics through the gateway: leads and deals created over REST by the leads and sales services
reach the analytics read models through Kafka only, and the reports (JSON and CSV) show them within
the caller's record scope; CSV needs the export permission."""

import csv
import io
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from crm_devstack.stack import RunningStack
from crm_platform.ids import new_id
from crm_platform.testing.polling import eventually

pytestmark = pytest.mark.e2e


def _client(stack: RunningStack, sub: str, roles: list[str], team: str) -> httpx.AsyncClient:
    return stack.client(stack.token(sub, roles, team=team, region="cn-east"))


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


T = TypeVar("T")


async def _until(read: Callable[[], Awaitable[T]], want: T) -> None:
    """Waits for a report to read `want` (projections follow events: seconds behind)."""
    assert await eventually(read, lambda got: got == want, timeout=60.0, interval=0.3) == want


async def test_reports_follow_rest_changes_through_events(stack: RunningStack) -> None:
    run = new_id()[-8:]
    team = f"team-{run}"
    rep_id = f"rep-{run}"
    async with (
        _client(stack, rep_id, ["sales_rep"], team) as rep,
        _client(stack, f"rep2-{run}", ["sales_rep"], team) as other_rep,
        _client(stack, f"analyst-{run}", ["analyst"], team) as analyst,
        _client(stack, f"mgr-{run}", ["sales_manager"], team) as manager,
    ):
        leads = []
        for name, source in (("Zhao", "webform"), ("Qian", "webform"), ("Sun", "event")):
            phone = f"+86 138{int(new_id()[-8:], 16) % 10**8:08d}"
            body = {"name": name, "company": f"{name} Co {run}", "phone": phone, "source": source}
            body |= {"owner_id": rep_id, "team": team}
            leads.append(_ok(await manager.post("/api/v1/leads", json=body), 201))
        assert [(lead["owner_id"], lead["team"]) for lead in leads] == [(rep_id, team)] * 3, leads
        _ok(await rep.post(f"/api/v1/leads/{leads[0]['id']}/activities", json={"kind": "call"}), 201)

        deals = []
        for index, amount in enumerate(("12000.00", "8000.00")):
            account = _ok(await rep.post("/api/v1/accounts", json={"name": f"Buyer {index} {run} Ltd"}), 201)
            money = {"amount": amount, "currency": "CNY"}
            body = {"account_id": account["id"], "name": f"Deal {index}", "amount": money}
            deals.append(_ok(await rep.post("/api/v1/opportunities", json=body), 201))
        _ok(await rep.post(f"/api/v1/opportunities/{deals[1]['id']}/lose", json={"reason": "price"}))

        async def sources() -> list[tuple[str, int, int, str | None]]:
            body = _ok(await analyst.get("/api/v1/reports/lead-sources", params={"team": team}))
            return [(r["key"], r["leads"], r["contacted"], r["contacted_rate"]) for r in body["rows"]]

        await _until(sources, [("event", 1, 0, "0.0000"), ("webform", 2, 1, "0.5000")])

        async def funnel() -> tuple[int, int, int, Any]:
            body = _ok(await analyst.get("/api/v1/reports/sales-funnel", params={"team": team}))
            first = body["stages"][0]
            return body["opportunities"], body["lost_count"], first["count"], first["amount"]

        await _until(funnel, (2, 1, 1, {"amount": "12000.00", "currency": "CNY"}))
        funnel_body = _ok(await analyst.get("/api/v1/reports/sales-funnel", params={"team": team}))
        assert funnel_body["win_rate"] == "0.0000" and funnel_body["average_deal_size"] is None

        # Record scope: reports are `own` for reps; another rep of the team sees none of these deals.
        mine = _ok(await rep.get("/api/v1/reports/sales-funnel"))
        assert mine["opportunities"] == 2
        theirs = _ok(await other_rep.get("/api/v1/reports/sales-funnel", params={"team": team}))
        assert theirs["opportunities"] == 0
        reps = _ok(await analyst.get("/api/v1/reports/rep-performance", params={"team": team}))
        assert [(row["owner_id"], row["activities"]) for row in reps["rows"]] == [(rep_id, 1)]

        # CSV is an export: the analyst may, the rep may not.
        exported = await analyst.get("/api/v1/reports/lead-sources", params={"team": team, "format": "csv"})
        assert exported.status_code == 200, exported.text
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [(row["key"], row["leads"], row["contacted_rate"]) for row in rows] == [
            ("event", "1", "0.0000"),
            ("webform", "2", "0.5000"),
        ]
        refused = await rep.get("/api/v1/reports/lead-sources", params={"format": "csv"})
        assert refused.status_code == 403, refused.text

        bad = await analyst.get("/api/v1/reports/service", params={"currency": "yuan"})
        assert bad.status_code == 422, bad.text

        # The same reports through the generic export route (`report=` chooses one), and the
        # forecast: permissioned, in the caller's scope, audited.
        generic = await analyst.get("/api/v1/exports/reports", params={"report": "lead-sources", "team": team})
        assert generic.status_code == 200, generic.text
        assert [(r["key"], r["leads"], r["contacted_rate"]) for r in csv.DictReader(io.StringIO(generic.text))] == [
            ("event", "1", "0.0000"),
            ("webform", "2", "0.5000"),
        ]
        stages = await manager.get("/api/v1/exports/reports", params={"report": "sales-funnel", "team": team})
        assert stages.status_code == 200, stages.text
        *stage_rows, total = list(csv.DictReader(io.StringIO(stages.text)))
        assert stage_rows[0]["stage"] and sum(int(row["count"]) for row in stage_rows) == 2
        assert (total["stage"], total["opportunities"], total["win_rate"]) == ("total", "2", "0.0000")
        assert (await rep.get("/api/v1/exports/reports", params={"report": "service"})).status_code == 403
        missing = await analyst.get("/api/v1/exports/reports")
        assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "report"
        forecast = await manager.get("/api/v1/exports/forecast", params={"team": team, "period": "quarter"})
        assert forecast.status_code == 200, forecast.text
        assert forecast.text.splitlines()[0] == "period,group,pipeline,weighted,commit,best_case,closed_won"
        assert (await rep.get("/api/v1/exports/forecast")).status_code == 403

    async with _client(stack, f"admin-{run}", ["admin"], team) as admin:
        audited = _ok(await admin.get("/api/v1/audit-events", params={"action": "export", "limit": 500}))
        exporters = {(e["resource"], e["actor"]["user_id"]) for e in audited["items"]}
        assert {("reports", f"analyst-{run}"), ("reports", f"mgr-{run}"), ("forecast", f"mgr-{run}")} <= exporters
        trail = await admin.get("/api/v1/exports/audit_events", params={"action": "export", "actor": f"mgr-{run}"})
        assert trail.status_code == 200, trail.text
        trail_rows = list(csv.DictReader(io.StringIO(trail.text)))
        assert sorted(row["resource"] for row in trail_rows) == ["forecast", "reports"]
