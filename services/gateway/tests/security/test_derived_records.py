"""Records derived from or attached to another resource's records follow the field rules of the
resource they belong to: a lead's activities and tasks those of activities and tasks (403 without a
grant), its score history those of the lead's score and grade, a ticket's comments and work log
those of the ticket, and the money of reports and win statistics those of the amounts they add up
(left out for callers who may not read them). Real routes, against fake services."""

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import httpx
import pytest
from crm.analytics.v1 import analytics_service_pb2 as analytics_pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceServicer, add_AnalyticsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from gateway.security.masking import mask_value
from gateway.testing import PolicyEdit, RoleClient, add_no_custom_fields, grant_fields

pytestmark = pytest.mark.integration

CNY = common_pb2.Money(amount="900.00", currency="CNY")
MONEY = {"amount": "900.00", "currency": "CNY"}


class FakeLeads(LeadsServiceServicer):
    async def ListLeadActivities(self, request: leads_pb.ListLeadActivitiesRequest, context: Any) -> Any:
        activity = leads_pb2.LeadActivity(id="a-1", lead_id=request.lead_id, kind="call", notes="Wants a demo")
        return leads_pb.ListLeadActivitiesResponse(items=[activity])

    async def LogLeadActivity(self, request: leads_pb.LogLeadActivityRequest, context: Any) -> Any:
        activity = leads_pb2.LeadActivity(id="a-2", lead_id=request.lead_id, kind=request.kind, notes=request.notes)
        lead = leads_pb2.Lead(id=request.lead_id, owner_id="u-1", name="Li")
        return leads_pb.LogLeadActivityResponse(activity=activity, lead=lead)

    async def ListLeadTasks(self, request: leads_pb.ListLeadTasksRequest, context: Any) -> Any:
        task = leads_pb2.LeadTask(id="t-1", lead_id=request.lead_id, kind="follow_up", owner_id="u-1", status="open")
        return leads_pb.ListLeadTasksResponse(items=[task])

    async def GetLeadScoreHistory(self, request: leads_pb.GetLeadScoreHistoryRequest, context: Any) -> Any:
        change = leads_pb2.ScoreChange(previous_score=10, score=40, previous_grade="C", grade="B")
        return leads_pb.GetLeadScoreHistoryResponse(items=[change])


class FakeServiceDesk(ServiceDeskServiceServicer):
    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        ticket = servicedesk_pb2.Ticket(id=request.ticket_id, subject="Printer", assignee_id="u-1")
        comment = servicedesk_pb2.TicketComment(id="c-1", ticket_id=request.ticket_id, author_id="u-1", body="Rebooted")
        work = servicedesk_pb2.WorkLogEntry(id="w-1", ticket_id=request.ticket_id, minutes=15, note="On site")
        return desk_pb.GetTicketResponse(ticket=ticket, comments=[comment], work_log=[work])


class FakeAnalytics(AnalyticsServiceServicer):
    async def GetCustomerValue(self, request: analytics_pb.GetCustomerValueRequest, context: Any) -> Any:
        row = analytics_pb.CustomerValueRow(
            account_id="acc-1", account_name="Initech", won_amount=CNY, paid_amount=CNY, churn_risk="high",
            owner_id="by-name" if request.order_by_name else "by-value",  # the order asked for
            reasons=[
                analytics_pb.ChurnReason(code="OVERDUE_INSTALLMENTS", detail="2 overdue installment(s), 80000.00 CNY"),
                analytics_pb.ChurnReason(code="NO_ACTIVITY", detail="no activity for 40 days (limit 30)"),
            ],
        )  # fmt: skip
        return analytics_pb.GetCustomerValueResponse(rows=[row])

    async def GetSalesFunnel(self, request: analytics_pb.GetSalesFunnelRequest, context: Any) -> Any:
        stage = analytics_pb.FunnelStage(stage="proposal", count=2, amount=CNY, reached=3)
        return analytics_pb.GetSalesFunnelResponse(
            stages=[stage], won_count=1, won_amount=CNY, average_deal_size=CNY, win_rate="0.5000"
        )

    async def GetLeadSourceReport(self, request: analytics_pb.GetLeadSourceReportRequest, context: Any) -> Any:
        row = analytics_pb.LeadSourceRow(key="camp-1", leads=5, won_revenue=CNY, cost=CNY, roi="0.0000")
        return analytics_pb.GetLeadSourceReportResponse(rows=[row])

    async def GetRepPerformance(self, request: analytics_pb.GetRepPerformanceRequest, context: Any) -> Any:
        # The owner asked for (the rows of one rep), else u-1's.
        row = analytics_pb.RepPerformanceRow(owner_id=request.filter.owner_id or "u-1", won_count=1, won_amount=CNY)
        return analytics_pb.GetRepPerformanceResponse(rows=[row])


class FakeSales(SalesServiceServicer):
    async def GetWinStatistics(self, request: sales_pb.GetWinStatisticsRequest, context: Any) -> Any:
        overall = sales_pb.WinStatistics(currency="CNY", won_amount=CNY, won_count=1, win_rate="1.0000")
        return sales_pb.GetWinStatisticsResponse(overall=[overall])


Client = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server()
    add_LeadsServiceServicer_to_server(FakeLeads(), server)
    add_ServiceDeskServiceServicer_to_server(FakeServiceDesk(), server)
    add_AnalyticsServiceServicer_to_server(FakeAnalytics(), server)
    add_SalesServiceServicer_to_server(FakeSales(), server)
    add_no_custom_fields(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
def client(role_client: RoleClient, target: str) -> Client:
    """`await client("marketing", *edits)`: the real gateway for one role, calling the fakes above."""

    async def make(role: str, *edits: PolicyEdit) -> httpx.AsyncClient:
        return await role_client(role, *edits, upstream=target)

    return make


# --- a lead's activities, tasks and score history ----------------------------------------------------


@pytest.mark.parametrize("role", ["marketing", "analyst"])
@pytest.mark.parametrize("part", ["activities", "tasks"])
async def test_roles_without_a_grant_for_activities_or_tasks_cannot_read_a_leads(
    client: Client, role: str, part: str
) -> None:
    http = await client(role)

    response = await http.get(f"/api/v1/leads/l-1/{part}")

    assert response.status_code == 403, response.text


async def test_a_leads_activities_and_tasks_follow_the_rules_for_activities_and_tasks(client: Client) -> None:
    http = await client(
        "sales_rep",
        grant_fields("sales_rep", "activities", notes="hidden"),
        grant_fields("sales_rep", "tasks", status="masked"),
    )

    activities = (await http.get("/api/v1/leads/l-1/activities")).json()["items"]
    tasks = (await http.get("/api/v1/leads/l-1/tasks")).json()["items"]

    assert [(a["id"], a["kind"]) for a in activities] == [("a-1", "call")] and "notes" not in activities[0]
    assert [t["id"] for t in tasks] == ["t-1"] and tasks[0]["status"] == mask_value("open", "text")


def grant_creating_activities_only(role: str) -> PolicyEdit:
    def edit(policy: dict[str, Any]) -> None:
        policy["roles"][role]["grants"]["activities"] = {"actions": ["create"], "scope": "all"}

    return edit


async def test_a_logged_activity_is_shown_only_to_who_may_read_activities(client: Client) -> None:
    marketing = await client("marketing", grant_creating_activities_only("marketing"))
    rep = await client("sales_rep", grant_fields("sales_rep", "activities", notes="hidden"))

    by_marketing = await marketing.post("/api/v1/leads/l-1/activities", json={"kind": "call", "notes": "Hi"})
    by_rep = await rep.post("/api/v1/leads/l-1/activities", json={"kind": "call", "notes": "Hi"})

    assert by_marketing.status_code == 201, by_marketing.text
    assert set(by_marketing.json()) == {"lead"}
    assert by_rep.json()["activity"]["kind"] == "call" and "notes" not in by_rep.json()["activity"]


async def test_score_history_is_shown_as_the_caller_sees_the_leads_score_and_grade(client: Client) -> None:
    analyst = await client("analyst")
    marketing = await client("marketing", grant_fields("marketing", "leads", score="hidden", grade="masked"))

    [clear] = (await analyst.get("/api/v1/leads/l-1/score-history")).json()["items"]
    [limited] = (await marketing.get("/api/v1/leads/l-1/score-history")).json()["items"]

    assert (clear["previous_score"], clear["score"], clear["previous_grade"], clear["grade"]) == (10, 40, "C", "B")
    assert "score" not in limited and "previous_score" not in limited
    assert limited["grade"] == mask_value("B", "text") and limited["previous_grade"] == mask_value("C", "text")


# --- a ticket's comments and work log ----------------------------------------------------------------


async def test_a_tickets_comments_and_work_log_follow_the_tickets_rules(client: Client) -> None:
    masked = await client("service_agent", grant_fields("service_agent", "tickets", comments="masked"))
    hidden = await client("service_agent", grant_fields("service_agent", "tickets", work_log="hidden"))

    ticket = (await masked.get("/api/v1/tickets/t-1")).json()
    without_log = (await hidden.get("/api/v1/tickets/t-1")).json()

    [comment] = ticket["comments"]
    assert comment["body"] == mask_value("Rebooted", "text") and comment["author_id"] == mask_value("u-1", "text")
    assert ticket["work_log"][0]["note"] == "On site"
    assert "work_log" not in without_log and without_log["comments"][0]["body"] == "Rebooted"


# --- money in reports and win statistics ------------------------------------------------------------


async def test_report_money_is_left_out_for_callers_who_may_not_read_the_amounts(client: Client) -> None:
    finance = await client("finance")
    analyst = await client("analyst")
    marketing = await client("marketing")

    by_finance = (await finance.get("/api/v1/reports/customer-value")).json()["items"][0]
    by_analyst = (await analyst.get("/api/v1/reports/customer-value")).json()["items"][0]
    by_marketing = (await marketing.get("/api/v1/reports/customer-value")).json()["items"][0]

    assert by_finance["won_amount"] == MONEY and by_finance["paid_amount"] == MONEY
    assert by_analyst["won_amount"] == MONEY and "paid_amount" not in by_analyst  # analysts read no contracts
    assert by_marketing["account_name"] == "Initech"
    assert "won_amount" not in by_marketing and "paid_amount" not in by_marketing
    # A reason that states a receivable's amount keeps only its code for who may not read amounts.
    assert by_finance["reasons"][0]["detail"] == "2 overdue installment(s), 80000.00 CNY"
    assert by_marketing["reasons"] == [
        {"code": "OVERDUE_INSTALLMENTS"},
        {"code": "NO_ACTIVITY", "detail": "no activity for 40 days (limit 30)"},
    ]


async def test_accounts_are_ranked_by_value_only_for_callers_shown_both_amounts(client: Client) -> None:
    for role, order in (("finance", "value"), ("analyst", "name"), ("marketing", "name")):
        http = await client(role)
        for path, params in (("reports/customer-value", {}), ("exports/reports", {"report": "customer-value"})):
            response = await http.get(f"/api/v1/{path}", params=params)
            assert response.status_code == 200, (role, path, response.text)
            asked = response.json()["items"][0]["owner_id"] if path.startswith("reports") else response.text
            assert f"by-{order}" in asked, (role, path)
        assert (await http.get("/api/v1/reports/customer-value")).json()["ordered_by"] == order


async def test_funnel_lead_source_and_rep_money_follow_the_amounts_they_add_up(client: Client) -> None:
    marketing = await client("marketing")
    masked = await client("analyst", grant_fields("analyst", "opportunities", amount="masked"))

    funnel = (await marketing.get("/api/v1/reports/sales-funnel")).json()
    sources = (await marketing.get("/api/v1/reports/lead-sources", params={"group_by": "campaign"})).json()
    reps = (await masked.get("/api/v1/reports/rep-performance")).json()

    assert funnel["won_count"] == 1 and funnel["stages"][0]["count"] == 2
    assert not {"won_amount", "average_deal_size"} & set(funnel) and "amount" not in funnel["stages"][0]
    assert "won_revenue" not in sources["rows"][0] and sources["rows"][0]["cost"] == MONEY  # marketing runs campaigns
    assert "roi" not in sources["rows"][0]  # with the cost, it would give the won revenue away
    assert reps["rows"][0]["won_amount"] == mask_value(MONEY, "money")


async def test_the_funnels_csv_ends_with_its_total_whose_money_follows_the_amounts_as_in_the_json(
    client: Client,
) -> None:
    """The report route's CSV and the export alike: the stages, then a `total` row with the win rate,
    the counts and the money of the whole funnel, left out or masked as the JSON answer has it."""
    marketing = await client("marketing")  # reads no deal amounts
    masked = await client("analyst", grant_fields("analyst", "opportunities", amount="masked"))
    clear = await client("analyst")

    for path, params in (("reports/sales-funnel", {"format": "csv"}), ("exports/reports", {"report": "sales-funnel"})):
        hidden_rows = csv_dicts(await marketing.get(f"/api/v1/{path}", params=params))
        masked_rows = csv_dicts(await masked.get(f"/api/v1/{path}", params=params))
        clear_rows = csv_dicts(await clear.get(f"/api/v1/{path}", params=params))

        assert [row["stage"] for row in clear_rows] == ["proposal", "total"]
        total = clear_rows[-1]
        assert (total["won_count"], total["win_rate"], total["count"]) == ("1", "0.5000", "")
        assert (total["won_amount"], total["average_deal_size"]) == ("900.00 CNY", "900.00 CNY")
        assert not {"amount", "won_amount", "average_deal_size"} & set(hidden_rows[-1])
        assert hidden_rows[-1]["win_rate"] == "0.5000"
        assert masked_rows[-1]["won_amount"] == masked_rows[-1]["average_deal_size"] == "*** CNY"
        assert "900.00" not in str(masked_rows), path


def csv_dicts(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.text)))


def reports_of_everyone(policy: dict[str, Any]) -> None:
    """A rep who reads every rep's reports (as with a second role, an analyst's of marketing), but
    only their own deals."""
    policy["roles"]["sales_rep"]["grants"]["reports"]["scope"] = "all"


async def test_report_money_shows_only_where_the_caller_reads_the_amounts_of_every_record_it_sums(
    client: Client,
) -> None:
    rep = await client("sales_rep")
    wide = await client("sales_rep", reports_of_everyone)

    own = (await rep.get("/api/v1/reports/rep-performance")).json()["rows"][0]
    everyones = (await wide.get("/api/v1/reports/rep-performance")).json()["rows"][0]

    assert own["won_amount"] == MONEY  # their own report: their own deals' amounts
    assert "won_amount" not in everyones and everyones["won_count"] == 1


async def test_a_reports_owner_id_me_is_the_caller_as_on_every_list(client: Client) -> None:
    rep = await client("sales_rep")

    mine = (await rep.get("/api/v1/reports/rep-performance", params={"owner_id": "me"})).json()

    assert [row["owner_id"] for row in mine["rows"]] == ["u-1"]  # the caller, not a rep named "me"


async def test_report_csv_and_exports_leave_out_the_money_too(client: Client) -> None:
    marketing = await client("marketing")

    report = await marketing.get("/api/v1/reports/customer-value", params={"format": "csv"})
    export = await marketing.get("/api/v1/exports/reports", params={"report": "customer-value"})

    for response in (report, export):
        assert response.status_code == 200, response.text
        header = next(csv.reader(io.StringIO(response.text)))
        assert "account_name" in header and not {"won_amount", "paid_amount"} & set(header)
        assert "80000.00" not in response.text and "OVERDUE_INSTALLMENTS" in response.text


async def test_win_statistics_show_the_won_amount_as_the_caller_sees_deal_amounts(client: Client) -> None:
    analyst = await client("analyst")
    hidden = await client("analyst", grant_fields("analyst", "opportunities", amount="hidden"))

    [clear] = (await analyst.get("/api/v1/forecast/win-statistics")).json()["overall"]
    [limited] = (await hidden.get("/api/v1/forecast/win-statistics")).json()["overall"]

    assert clear["won_amount"] == MONEY
    assert "won_amount" not in limited and limited["won_count"] == 1
