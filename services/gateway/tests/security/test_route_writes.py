"""Real routes that write through an owning service, against minimal fakes of the services: the
lead import checks every field its columns set before the service sees a byte, every write
leaves exactly one audit row, and that row holds the record as stored before and as the service
returned it after (the changed fields only, personal data masked)."""

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import (
    Conflict,
    FieldError,
    NotFound,
    PermissionDenied,
    ValidationFailed,
    missing_reference,
)
from crm_platform.idempotency import REPLAYED_METADATA
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from fastapi import FastAPI
from gateway.app import create_app
from gateway.config import Settings
from gateway.security.audit import AuditQuery
from gateway.testing import default_policy_document, grant_fields, policy_text, refuse
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "route-writes-secret-" + "w" * 30


class FakeLeads(LeadsServiceServicer):
    """Records what reaches the leads service."""

    def __init__(self) -> None:
        self.imports: list[tuple[leads_pb.ImportHeader, bytes]] = []
        self.webform_writes: list[leads_pb.UpdateWebformRequest | leads_pb.RotateWebformKeyRequest] = []
        self.deletes: list[leads_pb.DeleteLeadRequest] = []
        self.campaign_deletes: list[leads_pb.DeleteCampaignRequest] = []

    async def ImportLeads(self, request_iterator: AsyncIterator[leads_pb.ImportLeadsRequest], context: Any) -> Any:
        messages = [message async for message in request_iterator]
        self.imports.append((messages[0].header, b"".join(message.chunk for message in messages[1:])))
        if len(self.imports) > 1 and self.imports[-1] == self.imports[-2]:  # as the service answers a part sent again
            context.set_trailing_metadata((REPLAYED_METADATA,))
        return leads_pb.ImportLeadsResponse(lead_import=leads_pb.LeadImport(id="import-1", status="completed"))

    async def LogLeadActivity(self, request: leads_pb.LogLeadActivityRequest, context: Any) -> Any:
        activity = leads_pb2.LeadActivity(id="act-1", lead_id=request.lead_id, kind=request.kind)
        return leads_pb.LogLeadActivityResponse(activity=activity, lead=leads_pb2.Lead(id=request.lead_id))

    async def CreateScoringRule(self, request: leads_pb.CreateScoringRuleRequest, context: Any) -> Any:
        rule = leads_pb2.ScoringRule(id="sr-1", name=request.rule.name, points=request.rule.points)
        return leads_pb.CreateScoringRuleResponse(rule=rule)

    SCORING_RULE = leads_pb2.ScoringRule(id="sr-1", name="Big companies", points=5, enabled=True)

    async def ListScoringRules(self, request: leads_pb.ListScoringRulesRequest, context: Any) -> Any:
        return leads_pb.ListScoringRulesResponse(items=[self.SCORING_RULE])

    async def UpdateScoringRule(self, request: leads_pb.UpdateScoringRuleRequest, context: Any) -> Any:
        return leads_pb.UpdateScoringRuleResponse(rule=request.rule, previous=self.SCORING_RULE)

    async def DeleteScoringRule(self, request: leads_pb.DeleteScoringRuleRequest, context: Any) -> Any:
        return leads_pb.DeleteScoringRuleResponse(previous=self.SCORING_RULE)

    async def GetScoringRule(self, request: leads_pb.GetScoringRuleRequest, context: Any) -> Any:
        if request.rule_id != self.SCORING_RULE.id:
            await refuse(context, NotFound("scoring rule", request.rule_id))
        return leads_pb.GetScoringRuleResponse(rule=self.SCORING_RULE)

    async def SetGradeThresholds(self, request: leads_pb.SetGradeThresholdsRequest, context: Any) -> Any:
        previous = leads_pb2.GradeThresholds(a=85, b=50, c=30)
        return leads_pb.SetGradeThresholdsResponse(
            thresholds=request.thresholds, version=3, previous=previous, previous_version=2
        )

    async def CreateAssignmentRule(self, request: leads_pb.CreateAssignmentRuleRequest, context: Any) -> Any:
        rule = leads_pb2.AssignmentRule(id="ar-1", name=request.rule.name, user_ids=request.rule.user_ids)
        return leads_pb.CreateAssignmentRuleResponse(rule=rule)

    ASSIGNMENT_RULE = leads_pb2.AssignmentRule(id="ar-1", name="North", regions=["north"], user_ids=["u-2"])

    async def ListAssignmentRules(self, request: leads_pb.ListAssignmentRulesRequest, context: Any) -> Any:
        return leads_pb.ListAssignmentRulesResponse(items=[self.ASSIGNMENT_RULE])

    async def GetAssignmentRule(self, request: leads_pb.GetAssignmentRuleRequest, context: Any) -> Any:
        if request.rule_id != self.ASSIGNMENT_RULE.id:
            await refuse(context, NotFound("assignment rule", request.rule_id))
        return leads_pb.GetAssignmentRuleResponse(rule=self.ASSIGNMENT_RULE)

    async def UpdateAssignmentRule(self, request: leads_pb.UpdateAssignmentRuleRequest, context: Any) -> Any:
        return leads_pb.UpdateAssignmentRuleResponse(rule=request.rule, previous=self.ASSIGNMENT_RULE)

    async def DeleteAssignmentRule(self, request: leads_pb.DeleteAssignmentRuleRequest, context: Any) -> Any:
        return leads_pb.DeleteAssignmentRuleResponse(previous=self.ASSIGNMENT_RULE)

    async def CreateWebform(self, request: leads_pb.CreateWebformRequest, context: Any) -> Any:
        webform = leads_pb2.Webform(id="wf-1", name=request.webform.name, form_key="k" * 16)
        return leads_pb.CreateWebformResponse(webform=webform)

    # The lead l-1 as stored, and as each write leaves it.
    LEAD = leads_pb2.Lead(id="l-1", name="Li", phone="13812345678", status="new", owner_id="u-1", team="east")

    async def GetLead(self, request: leads_pb.GetLeadRequest, context: Any) -> Any:
        await self._in_scope(request.lead_id, context)
        return leads_pb.GetLeadResponse(lead=self.LEAD)

    async def _in_scope(self, lead_id: str, context: Any) -> None:
        if lead_id != self.LEAD.id:  # as the service answers a lead outside the caller's scope
            await refuse(context, NotFound("lead", lead_id))

    async def DeleteLead(self, request: leads_pb.DeleteLeadRequest, context: Any) -> Any:
        await self._in_scope(request.lead_id, context)
        self.deletes.append(request)
        return leads_pb.DeleteLeadResponse(previous=self.LEAD)

    CAMPAIGN = leads_pb2.Campaign(id="cmp-1", name="Expo", channel="event", version=3)

    async def GetCampaign(self, request: leads_pb.GetCampaignRequest, context: Any) -> Any:
        return leads_pb.GetCampaignResponse(campaign=await self._campaign(request.campaign_id, context))

    async def _campaign(self, campaign_id: str, context: Any) -> leads_pb2.Campaign:
        if campaign_id not in (self.CAMPAIGN.id, "cmp-3"):  # cmp-3: a deal names it
            await refuse(context, NotFound("campaign", campaign_id))
        campaign = leads_pb2.Campaign()
        campaign.CopyFrom(self.CAMPAIGN)
        campaign.id = campaign_id
        return campaign

    async def DeleteCampaign(self, request: leads_pb.DeleteCampaignRequest, context: Any) -> Any:
        campaign = await self._campaign(request.campaign_id, context)
        self.campaign_deletes.append(request)
        return leads_pb.DeleteCampaignResponse(previous=campaign)

    async def UpdateLead(self, request: leads_pb.UpdateLeadRequest, context: Any) -> Any:
        lead = leads_pb2.Lead(id="l-1", name="Li", phone="13912345678", status="new", owner_id="u-1", team="east")
        return leads_pb.UpdateLeadResponse(lead=lead, previous=self.LEAD)

    async def AssignLead(self, request: leads_pb.AssignLeadRequest, context: Any) -> Any:
        lead = leads_pb2.Lead(id="l-1", name="Li", phone="13812345678", status="new", owner_id=request.owner_id,
                              team="east")  # fmt: skip
        return leads_pb.AssignLeadResponse(lead=lead, previous=self.LEAD)

    async def GetWebform(self, request: leads_pb.GetWebformRequest, context: Any) -> Any:
        return leads_pb.GetWebformResponse(webform=self._webform(request.id))

    @staticmethod
    def _webform(webform_id: str) -> leads_pb2.Webform:
        return leads_pb2.Webform(id=webform_id, name="Expo", form_key="k-1", enabled=True, version=3)

    async def UpdateWebform(self, request: leads_pb.UpdateWebformRequest, context: Any) -> Any:
        self.webform_writes.append(request)
        webform = leads_pb2.Webform(id=request.id, name="Expo", form_key="k-1", enabled=True, rate_limit_per_minute=60,
                                    version=4)  # fmt: skip
        for path in request.update_mask.paths:
            setattr(webform, path, getattr(request.webform, path))
        return leads_pb.UpdateWebformResponse(webform=webform, previous=self._webform(request.id))

    async def RotateWebformKey(self, request: leads_pb.RotateWebformKeyRequest, context: Any) -> Any:
        self.webform_writes.append(request)
        webform = leads_pb2.Webform(id=request.id, name="Expo", form_key="k-2", enabled=True, version=5)
        return leads_pb.RotateWebformKeyResponse(webform=webform)

    async def ConvertLead(self, request: leads_pb.ConvertLeadRequest, context: Any) -> Any:
        lead = leads_pb2.Lead(id="l-1", name="Li", status="converted", owner_id="u-1", team="east")
        return leads_pb.ConvertLeadResponse(lead=lead, account_id="acc-9", contact_id="c-9", previous=self.LEAD)

    async def ReleaseLead(self, request: leads_pb.ReleaseLeadRequest, context: Any) -> Any:
        caller = context_from_metadata(context.invocation_metadata()).principal.user_id
        if request.own_only and self.LEAD.owner_id != caller:  # as the service refuses another rep's lead
            await refuse(context, PermissionDenied("releasing another rep's lead needs the grant to assign leads"))
        lead = leads_pb2.Lead(id="l-1", name="Li", status="recycled", in_pool=True, team="east")
        return leads_pb.ReleaseLeadResponse(lead=lead, previous=self.LEAD)

    async def ClaimLead(self, request: leads_pb.ClaimLeadRequest, context: Any) -> Any:
        lead = leads_pb2.Lead(id=request.lead_id, name="Li", status="new", owner_id="u-1", team="east")
        return leads_pb.ClaimLeadResponse(lead=lead)

    async def DisqualifyLead(self, request: leads_pb.DisqualifyLeadRequest, context: Any) -> Any:
        lead = leads_pb2.Lead(id="l-1", name="Li", phone="13812345678", status="unqualified", owner_id="u-1",
                              team="east", disqualified_reason=request.reason)  # fmt: skip
        return leads_pb.DisqualifyLeadResponse(lead=lead, previous=self.LEAD)


class FakeServiceDesk(ServiceDeskServiceServicer):
    async def AddTicketComment(self, request: desk_pb.AddTicketCommentRequest, context: Any) -> Any:
        comment = servicedesk_pb2.TicketComment(id="c-1", ticket_id=request.ticket_id, body=request.body)
        return desk_pb.AddTicketCommentResponse(comment=comment)

    async def LogWork(self, request: desk_pb.LogWorkRequest, context: Any) -> Any:
        entry = servicedesk_pb2.WorkLogEntry(id="w-1", ticket_id=request.ticket_id, minutes=request.minutes)
        return desk_pb.LogWorkResponse(entry=entry)

    TICKET = servicedesk_pb2.Ticket(id="t-1", subject="Printer", status="assigned", assignee_id="u-1", version=3)

    async def ChangeTicketStatus(self, request: desk_pb.ChangeTicketStatusRequest, context: Any) -> Any:
        ticket = servicedesk_pb2.Ticket(
            id="t-1", subject="Printer", status=request.status, assignee_id="u-1", version=4
        )
        return desk_pb.ChangeTicketStatusResponse(ticket=ticket, previous=self.TICKET)

    async def AssignTicket(self, request: desk_pb.AssignTicketRequest, context: Any) -> Any:
        ticket = servicedesk_pb2.Ticket(id="t-1", subject="Printer", status="assigned", assignee_id="u-2", version=4)
        return desk_pb.AssignTicketResponse(ticket=ticket, previous=self.TICKET)

    AGENT = servicedesk_pb2.Agent(id="u-2", name="Wu", capacity=5, available=True, version=1)

    async def UpdateAgent(self, request: desk_pb.UpdateAgentRequest, context: Any) -> Any:
        # The service also changed what the request did not name (availability).
        agent = servicedesk_pb2.Agent(id="u-2", name="Wu", capacity=request.agent.capacity, available=False, version=2)
        return desk_pb.UpdateAgentResponse(agent=agent, previous=self.AGENT)


class FakeAccounts(AccountsServiceServicer):
    def __init__(self) -> None:
        self.activity_scopes: list[RecordScope] = []  # the scope each LogActivity was sent under
        self.merges: list[accounts_pb.MergeAccountsRequest] = []

    async def LogActivity(self, request: accounts_pb.LogActivityRequest, context: Any) -> Any:
        self.activity_scopes.append(context_from_metadata(context.invocation_metadata()).scope)
        activity = accounts_pb2.Activity(id="a-1", account_id=request.account_id, kind=request.kind, actor_id="u-1")
        return accounts_pb.LogActivityResponse(activity=activity)

    ACCOUNT = accounts_pb2.Account(id="acc-1", name="Initech", owner_id="u-1", team="east", version=2)

    async def GetAccount(self, request: accounts_pb.GetAccountRequest, context: Any) -> Any:
        await self._in_scope(request.account_id, context)
        return accounts_pb.GetAccountResponse(account=self.ACCOUNT)

    async def _in_scope(self, account_id: str, context: Any, field: str = "") -> None:
        if account_id == "acc-gone":  # or out of the caller's scope: the service answers alike
            # One a request's body names (in `field`) is a 422 naming the field, one its path names a 404.
            error = missing_reference(field, "account", account_id) if field else NotFound("account", account_id)
            await refuse(context, error)

    async def CreateContact(self, request: accounts_pb.CreateContactRequest, context: Any) -> Any:
        if request.contact.account_id == "acc-gone":  # as the service refuses a body's unknown account
            await refuse(context, missing_reference("account_id", "account", request.contact.account_id))
        contact = accounts_pb2.Contact(id="c-1", account_id=request.contact.account_id, name=request.contact.name)
        return accounts_pb.CreateContactResponse(contact=contact)

    async def MergeAccounts(self, request: accounts_pb.MergeAccountsRequest, context: Any) -> Any:
        await self._in_scope(request.survivor_id, context)
        await self._in_scope(request.duplicate_id, context, field="duplicate_id")
        self.merges.append(request)
        survivor = accounts_pb2.Account(id=request.survivor_id, name="Initech", owner_id="u-1", version=3)
        duplicate = accounts_pb2.Account(id=request.duplicate_id, name="Initech Ltd", owner_id="u-1", version=1)
        return accounts_pb.MergeAccountsResponse(
            survivor=survivor, previous_survivor=self.ACCOUNT, previous_duplicate=duplicate
        )

    async def TransferAccount(self, request: accounts_pb.TransferAccountRequest, context: Any) -> Any:
        await self._in_scope(request.account_id, context)
        account = accounts_pb2.Account(id="acc-1", name="Initech", owner_id=request.new_owner_id, team="west",
                                       version=3)  # fmt: skip
        return accounts_pb.TransferAccountResponse(account=account, previous=self.ACCOUNT)

    async def ReleaseAccount(self, request: accounts_pb.ReleaseAccountRequest, context: Any) -> Any:
        await self._in_scope(request.account_id, context)
        account = accounts_pb2.Account(id="acc-1", name="Initech", team="east", in_pool=True, version=3)
        return accounts_pb.ReleaseAccountResponse(account=account, previous=self.ACCOUNT)


class FakeSales(SalesServiceServicer):
    def __init__(self) -> None:
        self.updates: list[sales_pb.UpdateOpportunityRequest] = []
        self.deal_lookups: list[tuple[str, RecordScope]] = []  # (campaign_id, scope) of each ListOpportunities
        self.contract_deletes: list[sales_pb.DeleteContractRequest] = []
        self.contract_terminations: list[sales_pb.TerminateContractRequest] = []
        self.quote_deletes: list[sales_pb.DeleteQuoteRequest] = []
        self.assignments: list[sales_pb.AssignOpportunityRequest] = []
        self.quote_updates: list[sales_pb.UpdateQuoteRequest] = []
        self.plan_updates: list[sales_pb.UpdatePaymentPlanRequest] = []
        self.payment_keys: dict[str, sales_pb.RecordPaymentRequest] = {}

    async def ListOpportunities(self, request: sales_pb.ListOpportunitiesRequest, context: Any) -> Any:
        self.deal_lookups.append((request.campaign_id, context_from_metadata(context.invocation_metadata()).scope))
        deals = [sales_pb2.Opportunity(id="o-7", campaign_id="cmp-3")] if request.campaign_id == "cmp-3" else []
        return sales_pb.ListOpportunitiesResponse(items=deals)

    DEAL = sales_pb2.Opportunity(id="o-1", name="Robots", stage="qualify", probability="0.2", version=5)

    async def AssignOpportunity(self, request: sales_pb.AssignOpportunityRequest, context: Any) -> Any:
        if request.id == "o-404":  # as the service answers a deal outside the caller's scope
            await refuse(context, NotFound("opportunity", request.id))
        self.assignments.append(request)
        deal = sales_pb2.Opportunity(id="o-1", name="Robots", stage="qualify", probability="0.2",
                                     owner_id=request.owner_id, team=request.team, version=6)  # fmt: skip
        return sales_pb.AssignOpportunityResponse(opportunity=deal, previous=self.DEAL)

    async def UpdateOpportunity(self, request: sales_pb.UpdateOpportunityRequest, context: Any) -> Any:
        self.updates.append(request)
        deal = sales_pb2.Opportunity(id="o-1", name="Robots", stage="qualify", product_line="GTX", version=6)
        if request.override_collision:
            deal.collision_override_by, deal.colliding_opportunity_id = "u-1", "o-9"
            deal.collision_override_reason = request.override_reason
        return sales_pb.UpdateOpportunityResponse(opportunity=deal, previous=self.DEAL)

    async def MoveOpportunityStage(self, request: sales_pb.MoveOpportunityStageRequest, context: Any) -> Any:
        deal = sales_pb2.Opportunity(id="o-1", name="Robots", stage=request.stage, probability="0.6", version=6)
        return sales_pb.MoveOpportunityStageResponse(opportunity=deal, previous=self.DEAL)

    CONTRACT = sales_pb2.Contract(id="k-1", title="Robots", status="pending_approval", version=2)

    async def TerminateContract(self, request: sales_pb.TerminateContractRequest, context: Any) -> Any:
        self.contract_terminations.append(request)
        return sales_pb.TerminateContractResponse(
            contract=sales_pb2.Contract(id=request.id, title="Robots", status="terminated", version=3),
            previous=sales_pb2.Contract(id=request.id, title="Robots", status="signed", version=2),
        )

    async def DeleteContract(self, request: sales_pb.DeleteContractRequest, context: Any) -> Any:
        if request.id == "k-404":  # as the service answers a contract outside the caller's scope
            await refuse(context, NotFound("contract", request.id))
        self.contract_deletes.append(request)
        return sales_pb.DeleteContractResponse(previous=self.CONTRACT)

    DISCOUNTED = sales_pb2.LineItem(product_name="GTX", quantity="1", discount_percent="20")  # a manager gave 20 % off
    QUOTES = {
        "q-1": sales_pb2.Quote(id="q-1", status="rejected", version=4),
        "q-3": sales_pb2.Quote(id="q-3", status="pending_approval", line_items=[DISCOUNTED], version=2),
    }

    async def _quote(self, quote_id: str, context: Any) -> sales_pb2.Quote:
        if quote_id not in self.QUOTES:  # as the service answers a quote outside the caller's scope
            await refuse(context, NotFound("quote", quote_id))
        return self.QUOTES[quote_id]

    async def UpdateQuote(self, request: sales_pb.UpdateQuoteRequest, context: Any) -> Any:
        previous = await self._quote(request.id, context)
        if any(item.discount_percent for item in previous.line_items) and not request.HasField("discounts_scope"):
            # As the service refuses new line items on a quote with discounts to one who may not set them.
            refused = "you may not set field 'line_items.discount_percent' of quotes"
            await refuse(context, PermissionDenied(refused, field="line_items.discount_percent"))
        self.quote_updates.append(request)
        discount = max((item.discount_percent or "0" for item in request.line_items), key=Decimal)
        quote = sales_pb2.Quote(id="q-1", status="pending_approval", max_discount_percent=discount, version=5)
        return sales_pb.UpdateQuoteResponse(quote=quote, previous=previous)

    async def DeleteQuote(self, request: sales_pb.DeleteQuoteRequest, context: Any) -> Any:
        previous = await self._quote(request.id, context)
        self.quote_deletes.append(request)
        return sales_pb.DeleteQuoteResponse(previous=previous)

    PLAN = sales_pb2.PaymentPlan(
        id="pp-1", contract_id="k-1", version=1,
        installments=[sales_pb2.Installment(id="i-1", sequence=1, due_date="2027-01-31", status="paid",
                                            amount=common_pb2.Money(amount="100.00", currency="CNY"))],
    )  # fmt: skip

    async def GetPaymentPlan(self, request: sales_pb.GetPaymentPlanRequest, context: Any) -> Any:
        if request.contract_id == "k-404":
            await refuse(context, NotFound("contract", request.contract_id))
        return sales_pb.GetPaymentPlanResponse(payment_plan=self.PLAN)

    async def UpdatePaymentPlan(self, request: sales_pb.UpdatePaymentPlanRequest, context: Any) -> Any:
        if request.contract_id == "k-404":
            await refuse(context, NotFound("contract", request.contract_id))
        self.plan_updates.append(request)
        if request.installments[0].due_date != self.PLAN.installments[0].due_date:
            paid = "installments[0] (due 2027-01-31) is paid in part or in full: it cannot be changed"
            await refuse(context, Conflict(paid, existing_id="i-1", reason="INSTALLMENT_PAID"))
        plan = sales_pb2.PaymentPlan(
            id="pp-1", contract_id="k-1", version=2,
            installments=[sales_pb2.Installment(id=f"i-{n}", sequence=n, due_date=item.due_date, amount=item.amount)
                          for n, item in enumerate(request.installments, start=1)],
        )  # fmt: skip
        return sales_pb.UpdatePaymentPlanResponse(payment_plan=plan, previous=self.PLAN)

    async def RecordPayment(self, request: sales_pb.RecordPaymentRequest, context: Any) -> Any:
        """As the service answers a keyed request: the first result again, or a refusal naming the key."""
        unkeyed = sales_pb.RecordPaymentRequest()
        unkeyed.CopyFrom(request)
        unkeyed.ClearField("idempotency_key")
        if self.payment_keys.setdefault(request.idempotency_key, unkeyed) != unkeyed:
            await refuse(
                context, ValidationFailed([FieldError("idempotency_key", "was used with a different request")])
            )
        payment = sales_pb2.Payment(id="pay-1", contract_id=request.contract_id, amount=request.amount,
                                    external_reference=request.external_reference)  # fmt: skip
        return sales_pb.RecordPaymentResponse(payment=payment, created=True)

    async def ApproveContract(self, request: sales_pb.ApproveContractRequest, context: Any) -> Any:
        if request.id == "k-2":  # waits for another role's approval
            await refuse(context, PermissionDenied("the approval chain waits for finance"))
        contract = sales_pb2.Contract(id=request.id, title="Robots", status="approved", version=3)
        return sales_pb.ApproveContractResponse(contract=contract, previous=self.CONTRACT)

    async def SignContract(self, request: sales_pb.SignContractRequest, context: Any) -> Any:
        await refuse(context, NotFound("contract", request.id))  # out of the caller's scope

    async def IssueInvoice(self, request: sales_pb.IssueInvoiceRequest, context: Any) -> Any:
        invoice = sales_pb2.Invoice(id="i-1", status="issued", number=request.number)
        return sales_pb.IssueInvoiceResponse(invoice=invoice, previous=sales_pb2.Invoice(id="i-1", status="requested"))


class Gateway:
    def __init__(
        self, app: FastAPI, client: httpx.AsyncClient, leads: FakeLeads, sales: FakeSales, accounts: FakeAccounts
    ) -> None:
        self.app = app
        self.client = client
        self.leads = leads
        self.sales = sales
        self.accounts = accounts

    @staticmethod
    def auth(*roles: str, sub: str = "u-1") -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub=sub, roles=list(roles), team="east", region="north")
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Gateway]:
    async with started_gateway(tmp_path, migrated_sqlite) as started:
        yield started


@asynccontextmanager
async def started_gateway(tmp_path: Path, migrated_sqlite: Path, *, policy_path: str = "") -> AsyncIterator[Gateway]:
    """The real routes before fake services, under the default policy or the one at `policy_path`."""
    leads, sales, accounts = FakeLeads(), FakeSales(), FakeAccounts()
    server = grpc.aio.server()
    add_LeadsServiceServicer_to_server(leads, server)
    add_ServiceDeskServiceServicer_to_server(FakeServiceDesk(), server)
    add_AccountsServiceServicer_to_server(accounts, server)
    add_SalesServiceServicer_to_server(sales, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    settings = Settings(
        dev_mode=True,
        dev_jwt_secret=SECRET,
        database_url=f"sqlite+aiosqlite:///{database}",
        leads_target=f"127.0.0.1:{port}",
        accounts_target=f"127.0.0.1:{port}",
        sales_target=f"127.0.0.1:{port}",
        service_desk_target=f"127.0.0.1:{port}",
        analytics_target="",
        audit_relay_enabled=False,
        audit_ingest_enabled=False,
        policy_path=policy_path,
    )
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
        yield Gateway(app, client, leads, sales, accounts)
    await app.state.upstreams.close()
    await app.state.security.stop()
    await server.stop(None)


async def post_import(gateway: Gateway, body: str, role: str = "sales_rep", **params: Any) -> httpx.Response:
    content_type = {"json": "application/json", "jsonl": "application/x-ndjson"}.get(
        params.get("format", ""), "text/csv"
    )
    if "column_map" in params:
        params["column_map"] = json.dumps(params["column_map"])
    return await gateway.client.post(
        "/api/v1/leads/import",
        params=params,
        content=body.encode(),
        headers={**gateway.auth(role), "Content-Type": content_type},
    )


@pytest.mark.parametrize(
    ("body", "params", "field"),
    [
        ("name,owner_id\nLi,u-2\n", {}, "owner_id"),
        ("\ufeffName,Team\nLi,west\n", {}, "team"),
        ("name,who\nLi,u-2\n", {"column_map": {"name": "name", "who": "owner_id"}}, "owner_id"),
        ('[{"name": "Li", "team": "west"}]', {"format": "json"}, "team"),
        ('{"name": "Li"}\n{"name": "Wu", "owner_id": "u-2"}\n', {"format": "jsonl"}, "owner_id"),
        # A later CSV part continues the first part's header, which this request does not show.
        ("Wu,2\n", {"import_key": "k", "part": 2, "final": "true"}, "owner_id"),
        # A JSON line cut at the end of a part: its other keys come with the next part.
        ('{"name": "Li"}\n{"name": "Wu", "ow', {"format": "jsonl", "import_key": "k", "part": 1}, "owner_id"),
        # Two lines the service reads as one record (it counts quotes, escaped or not, to find its end).
        ('{"name": "a\\"",\n"owner_id": "u-2", "z": "\\""}\n', {"format": "jsonl"}, "owner_id"),
    ],
)
async def test_a_rep_may_not_import_fields_they_may_not_set(
    gateway: Gateway, body: str, params: dict[str, Any], field: str
) -> None:
    response = await post_import(gateway, body, **params)

    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["field"] == field
    assert gateway.leads.imports == []  # the service never saw the file


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ("Full Name,Phone Number,Shoe size\nLi,138,42\n", {}),
        # The rules choose the owners, as for a lead a rep makes without one.
        ("name,phone\nLi,1\n", {"assign": "true"}),
        ('[{"name": "Li", "hobby": "chess"}]', {"format": "json"}),
        ("Wu,2\n", {"import_key": "k", "part": 2, "final": "true", "column_map": {"Name": "name"}}),
        # A header csv cannot read (classic Mac line ends): the service refuses the file, saying why.
        ("name,email\rA,a@x.cn\r", {}),
    ],
)
async def test_a_rep_imports_the_fields_they_may_set(gateway: Gateway, body: str, params: dict[str, Any]) -> None:
    response = await post_import(gateway, body, **params)

    assert response.status_code == 200, response.text
    [(header, content)] = gateway.leads.imports
    assert content == body.encode() and header.part == params.get("part", 0)


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("body", "params"),
    [
        (DEEP, {"format": "json"}),
        (f"{DEEP}\n", {"format": "jsonl"}),
        (f'[{{"name": "Li", "custom": {DEEP}}}]', {"format": "json"}),
    ],
)
async def test_an_import_nested_deeper_than_json_can_be_read_goes_to_the_service_to_refuse(
    gateway: Gateway, body: str, params: dict[str, Any]
) -> None:
    """The gateway cannot tell its columns (which a manager may all set); the service refuses the file
    or the row, saying why."""
    response = await post_import(gateway, body, role="sales_manager", **params)

    assert response.status_code == 200, response.text
    [(_, content)] = gateway.leads.imports
    assert content == body.encode()


async def test_a_column_map_nested_deeper_than_json_can_be_read_is_a_422_naming_it(gateway: Gateway) -> None:
    response = await gateway.client.post(
        "/api/v1/leads/import",
        params={"column_map": DEEP},
        content=b"name\nLi\n",
        headers={**gateway.auth("sales_rep"), "Content-Type": "text/csv"},
    )

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "column_map"
    assert gateway.leads.imports == []


async def test_a_manager_imports_owners_and_teams(gateway: Gateway) -> None:
    body = "name,owner_id,team\nLi,u-2,west\n"
    response = await post_import(gateway, body, role="sales_manager")

    assert response.status_code == 200, response.text
    # A part's rejections are its `rows`: the summary does not also show an empty list of them.
    assert "rejected_rows" not in response.json()["import"] and "rows" in response.json()
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    [audited] = [row for row in rows if row["action"] == "import"]
    assert audited["reason"].startswith("part 1: ") and " merged, " in audited["reason"]
    assert [content for _, content in gateway.leads.imports] == [body.encode()]


RULE = {"name": "Big companies", "field": "company", "operator": "contains", "value": "Inc", "points": 10}
ASSIGNMENT = {"name": "North", "regions": ["north"], "user_ids": ["u-2"]}


@pytest.mark.parametrize(
    ("role", "method", "path", "body", "action", "record_id"),
    [
        ("sales_rep", "POST", "/leads/l-1/activities", {"kind": "call"}, "log_activity", "l-1"),
        ("sales_manager", "POST", "/lead-scoring-rules", RULE, "create_scoring_rule", "sr-1"),
        ("sales_manager", "PUT", "/lead-scoring-rules/sr-1", RULE, "update_scoring_rule", "sr-1"),
        ("sales_manager", "DELETE", "/lead-scoring-rules/sr-1", None, "delete_scoring_rule", "sr-1"),
        ("sales_manager", "PUT", "/lead-scoring-rules/thresholds", {"a": 80, "b": 60, "c": 40}, "set_grade_thresholds",
         "grade_thresholds"),
        ("sales_manager", "POST", "/lead-assignment-rules", ASSIGNMENT, "create_assignment_rule", "ar-1"),
        ("sales_manager", "PUT", "/lead-assignment-rules/ar-1", ASSIGNMENT, "update_assignment_rule", "ar-1"),
        ("sales_manager", "DELETE", "/lead-assignment-rules/ar-1", None, "delete_assignment_rule", "ar-1"),
        ("marketing", "POST", "/webforms", {"name": "Expo"}, "create_webform", "wf-1"),
        ("service_agent", "POST", "/tickets/t-1/comments", {"body": "Rebooted it"}, "comment", "t-1"),
        ("service_agent", "POST", "/tickets/t-1/work-log", {"minutes": 15}, "log_work", "t-1"),
    ],
)  # fmt: skip
async def test_a_write_leaves_one_audit_row(
    gateway: Gateway, role: str, method: str, path: str, body: Any, action: str, record_id: str
) -> None:
    response = await gateway.client.request(method, f"/api/v1{path}", json=body, headers=gateway.auth(role))

    assert response.is_success, response.text
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["record_id"], row["actor"]["user_id"]) for row in rows] == [(action, record_id, "u-1")]
    assert rows[0]["after"] or rows[0]["before"]
    assert rows[0]["status_code"] == response.status_code


@pytest.mark.parametrize(
    ("method", "path", "body", "denied"),
    [
        ("POST", "/lead-scoring-rules", RULE, "you may not manage lead scoring rules"),
        ("PUT", "/lead-scoring-rules/thresholds", {"a": 80, "b": 60, "c": 40}, "you may not manage lead scoring rules"),
        ("PUT", "/lead-assignment-rules/ar-1", ASSIGNMENT, "you may not manage lead assignment rules"),
        ("DELETE", "/lead-assignment-rules/ar-1", None, "you may not manage lead assignment rules"),
        ("POST", "/leads/l-1/assign", {"owner_id": "u-2"}, "you may not assign leads"),
    ],
)
async def test_a_refusal_names_what_the_route_does(
    gateway: Gateway, method: str, path: str, body: Any, denied: str
) -> None:
    response = await gateway.client.request(method, f"/api/v1{path}", json=body, headers=gateway.auth("sales_rep"))

    assert response.status_code == 403, response.text
    assert response.json()["detail"] == denied


@pytest.mark.parametrize(
    ("role", "method", "path", "body", "before", "after"),
    [
        # Leads: personal data masked on both sides.
        ("sales_rep", "PATCH", "/leads/l-1", {"phone": "13912345678"},
         {"phone": "138****5678"}, {"phone": "139****5678"}),
        ("sales_manager", "POST", "/leads/l-1/assign", {"owner_id": "u-2"}, {"owner_id": "u-1"}, {"owner_id": "u-2"}),
        ("sales_manager", "PUT", "/lead-scoring-rules/sr-1", {**RULE, "points": 10},
         {"points": 5, "field": "", "operator": "", "value": ""},
         {"points": 10, "field": "company", "operator": "contains", "value": "Inc"}),
        ("sales_manager", "PUT", "/lead-scoring-rules/thresholds", {"a": 90, "b": 60, "c": 30},
         {"a": 85, "b": 50, "version": 2}, {"a": 90, "b": 60, "version": 3}),
        ("sales_manager", "DELETE", "/lead-assignment-rules/ar-1", None,
         {"id": "ar-1", "name": "North", "position": 0, "enabled": False, "regions": ["north"], "industries": [],
          "sources": [], "min_score": 0, "max_score": 0, "team": "", "user_ids": ["u-2"], "strategy": "",
          "capacity": 0, "version": 0, "lead_team": ""}, None),
        ("sales_rep", "POST", "/leads/l-1/disqualify", {"reason": "No budget"},
         {"status": "new", "disqualified_reason": ""}, {"status": "unqualified", "disqualified_reason": "No budget"}),
        # Accounts.
        ("sales_manager", "POST", "/accounts/acc-1/transfer", {"new_owner_id": "u-2", "reason": "leave"},
         {"owner_id": "u-1", "team": "east", "version": 2}, {"owner_id": "u-2", "team": "west", "version": 3}),
        ("sales_rep", "POST", "/accounts/acc-1/release", {"reason": "no fit"},
         {"owner_id": "u-1", "in_pool": False, "version": 2}, {"owner_id": "", "in_pool": True, "version": 3}),
        # Sales: state transitions, with what the service changed besides the state.
        ("sales_rep", "POST", "/opportunities/o-1/stage", {"stage": "proposal"},
         {"stage": "qualify", "probability": "0.2", "version": 5},
         {"stage": "proposal", "probability": "0.6", "version": 6}),
        ("finance", "POST", "/contracts/k-1/approve", {"comment": "ok"},
         {"status": "pending_approval", "version": 2}, {"status": "approved", "version": 3}),
        ("finance", "POST", "/invoices/i-1/issue", {"number": "INV-7"},
         {"status": "requested", "number": None}, {"status": "issued", "number": "INV-7"}),
        # Service desk.
        ("service_agent", "POST", "/tickets/t-1/status", {"status": "in_progress"},
         {"status": "assigned", "version": 3}, {"status": "in_progress", "version": 4}),
        ("service_manager", "POST", "/tickets/t-1/assign", {"assignee_id": "u-2"},
         {"assignee_id": "u-1", "version": 3}, {"assignee_id": "u-2", "version": 4}),
        ("service_manager", "PATCH", "/agents/u-2", {"capacity": 9},
         {"capacity": 5, "available": True, "version": 1}, {"capacity": 9, "available": False, "version": 2}),
    ],
)  # fmt: skip
async def test_the_audit_row_of_a_write_holds_the_record_before_and_after(
    gateway: Gateway, role: str, method: str, path: str, body: Any, before: Any, after: Any
) -> None:
    response = await gateway.client.request(method, f"/api/v1{path}", json=body, headers=gateway.auth(role))

    assert response.is_success, response.text
    [row] = (await gateway.app.state.security.audit.query(AuditQuery()))[0]
    assert (row["before"], row["after"]) == (before, after)
    assert row["fields"] == sorted(before)


@pytest.mark.parametrize(
    ("path", "status", "record_id", "reason"),
    [
        ("/contracts/k-2/approve", 403, "k-2", "approve: the approval chain waits for finance"),
        ("/contracts/k-3/sign", 404, "k-3", "update: contract k-3 not found"),
    ],
)
async def test_a_refusal_by_the_owning_service_is_audited_as_denied(
    gateway: Gateway, path: str, status: int, record_id: str, reason: str
) -> None:
    response = await gateway.client.post(f"/api/v1{path}", json={}, headers=gateway.auth("sales_manager"))

    assert response.status_code == status, response.text
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["outcome"], row["resource"], row["record_id"], row["reason"]) for row in rows] == [
        ("denied", "denied", "contracts", record_id, reason)
    ]
    assert rows[0]["status_code"] == status and rows[0]["actor"]["user_id"] == "u-1"


async def test_a_managers_collision_override_on_patch_reaches_the_service_and_is_audited(gateway: Gateway) -> None:
    body = {"product_line": "GTX", "override_collision": True, "override_reason": "runs the roll-out"}
    response = await gateway.client.patch("/api/v1/opportunities/o-1", json=body, headers=gateway.auth("sales_manager"))

    assert response.status_code == 200, response.text
    [sent] = gateway.sales.updates
    assert list(sent.update_mask.paths) == ["product_line"]  # the override is not a field of the deal
    assert (sent.override_collision, sent.override_reason) == (True, "runs the roll-out")
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    overrides = [row for row in rows if row["action"] == "override_collision"]
    assert [(row["record_id"], row["reason"]) for row in overrides] == [("o-1", "over o-9: runs the roll-out")]


@pytest.mark.parametrize(
    ("role", "scope"),
    [
        # An agent owns only their own activities, but visits the accounts of their region.
        ("service_agent", RecordScope(ScopeKind.REGION, owner_id="u-1", team="east", region="north")),
        ("sales_rep", RecordScope(ScopeKind.OWN, owner_id="u-1", team="east", region="north")),
    ],
)
async def test_an_activity_is_logged_on_an_account_the_caller_may_read(
    gateway: Gateway, role: str, scope: RecordScope
) -> None:
    response = await gateway.client.post(
        "/api/v1/accounts/acc-1/activities", json={"kind": "visit", "subject": "On site"}, headers=gateway.auth(role)
    )

    assert response.status_code == 201, response.text
    assert gateway.accounts.activity_scopes == [scope]  # the service checks the account under it


async def test_a_merges_duplicate_the_caller_cannot_read_is_a_422_naming_it_and_nothing_is_merged(
    gateway: Gateway,
) -> None:
    """A missing duplicate (or one out of scope) is refused as the service refuses it: a 422 naming
    the body's field, not a 404."""
    response = await gateway.client.post(
        "/api/v1/accounts/acc-1/merge", json={"duplicate_id": "acc-gone"}, headers=gateway.auth("sales_manager")
    )

    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["detail"] == "duplicate_id: account acc-gone does not exist"
    assert problem["errors"] == [{"field": "duplicate_id", "message": "account acc-gone does not exist"}]
    assert gateway.accounts.merges == []
    # The survivor is the account the path addresses: not found there.
    gone = await gateway.client.post(
        "/api/v1/accounts/acc-gone/merge", json={"duplicate_id": "acc-1"}, headers=gateway.auth("sales_manager")
    )
    assert gone.status_code == 404, gone.text


async def test_a_contact_created_under_an_account_the_path_names_answers_404_when_it_is_not_there(
    gateway: Gateway,
) -> None:
    """POST /contacts names the account in its body (a 422 naming account_id); under
    /accounts/{account_id}/contacts the path addresses it, and a path's record not found is a 404."""
    headers = gateway.auth("sales_rep")
    in_body = await gateway.client.post(
        "/api/v1/contacts", json={"account_id": "acc-gone", "name": "Li"}, headers=headers
    )
    assert in_body.status_code == 422, in_body.text
    assert in_body.json()["errors"] == [{"field": "account_id", "message": "account acc-gone does not exist"}]

    in_path = await gateway.client.post("/api/v1/accounts/acc-gone/contacts", json={"name": "Li"}, headers=headers)
    assert in_path.status_code == 404, in_path.text
    assert in_path.json()["detail"] == "account acc-gone not found"

    created = await gateway.client.post("/api/v1/accounts/acc-1/contacts", json={"name": "Li"}, headers=headers)
    assert created.status_code == 201, created.text


@pytest.mark.parametrize(
    ("role", "body", "status"),
    [
        # Marketing may update leads but create no account, contact or deal.
        ("marketing", {}, 403),
        ("marketing", {"account_id": "acc-1"}, 403),
        ("sales_rep", {"create_opportunity": True, "opportunity": {"name": "Robots"}}, 200),
        ("sales_rep", {"account_id": "acc-1"}, 200),
    ],
)
async def test_converting_a_lead_needs_the_grants_of_what_it_creates(
    gateway: Gateway, role: str, body: dict[str, Any], status: int
) -> None:
    response = await gateway.client.post("/api/v1/leads/l-1/convert", json=body, headers=gateway.auth(role))

    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("role", "caller", "status"),
    [
        ("sales_rep", "u-1", 200),  # the owner gives their own lead back
        ("marketing", "u-9", 403),  # someone else's lead: an ownership change, which needs assign
        ("sales_manager", "u-9", 200),
    ],
)
async def test_a_lead_goes_back_to_the_pool_by_its_owner_or_someone_who_may_assign(
    gateway: Gateway, role: str, caller: str, status: int
) -> None:
    response = await gateway.client.post(
        "/api/v1/leads/l-1/release", json={"reason": "not mine"}, headers=gateway.auth(role, sub=caller)
    )

    assert response.status_code == status, response.text


async def test_a_lead_goes_back_to_the_pool_without_a_body(gateway: Gateway) -> None:
    response = await gateway.client.post("/api/v1/leads/l-1/release", headers=gateway.auth("sales_rep"))

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("role", "status"),
    [
        ("sales_rep", 200),
        # Marketing updates leads but logs no activity: a lead it claimed would wait unworked for
        # the recycling timer, kept from the reps who may work it.
        ("marketing", 403),
    ],
)
async def test_a_pool_lead_is_claimed_only_by_who_may_log_its_first_contact(
    gateway: Gateway, role: str, status: int
) -> None:
    response = await gateway.client.post("/api/v1/leads/l-1/claim", headers=gateway.auth(role))

    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["detail"] == "claiming a lead from the pool needs the grant to create activities"


async def test_a_lead_is_deleted_at_its_etags_version_by_who_may_delete_leads_and_audited_as_it_was(
    gateway: Gateway,
) -> None:
    manager = gateway.auth("sales_manager")

    deleted = await gateway.client.delete("/api/v1/leads/l-1", headers={**manager, "If-Match": '"7"'})
    elsewhere = await gateway.client.delete("/api/v1/leads/l-2", headers=manager)
    by_a_rep = await gateway.client.delete("/api/v1/leads/l-1", headers=gateway.auth("sales_rep"))

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert (elsewhere.status_code, by_a_rep.status_code) == (404, 403)
    assert [(request.lead_id, request.expected_version) for request in gateway.leads.deletes] == [("l-1", 7)]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["record_id"], row["outcome"]) for row in rows] == [
        ("denied", "l-1", "denied"),
        ("denied", "l-2", "denied"),
        ("delete", "l-1", "allowed"),
    ]
    audited = rows[-1]
    assert audited["after"] is None
    assert (audited["before"]["name"], audited["before"]["phone"]) == ("Li", "138****5678")  # masked as on any write


async def test_a_campaign_is_deleted_at_its_etags_version_by_who_may_delete_campaigns_and_audited_as_it_was(
    gateway: Gateway,
) -> None:
    marketing = gateway.auth("marketing")

    deleted = await gateway.client.delete("/api/v1/campaigns/cmp-1", headers={**marketing, "If-Match": '"3"'})
    missing = await gateway.client.delete("/api/v1/campaigns/cmp-2", headers=marketing)
    by_a_rep = await gateway.client.delete("/api/v1/campaigns/cmp-1", headers=gateway.auth("sales_rep"))

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert (missing.status_code, by_a_rep.status_code) == (404, 403)
    assert [(r.campaign_id, r.expected_version) for r in gateway.leads.campaign_deletes] == [("cmp-1", 3)]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["record_id"], row["outcome"]) for row in rows] == [
        ("denied", "cmp-1", "denied"),
        ("denied", "cmp-2", "denied"),
        ("delete", "cmp-1", "allowed"),
    ]
    audited = rows[-1]
    assert audited["after"] is None
    assert audited["resource"] == "campaigns"
    assert (audited["before"]["name"], audited["before"]["channel"]) == ("Expo", "event")


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PATCH", "/api/v1/campaigns/cmp-1", {"owner_id": "u-x"}, "owner_id"),
        ("PATCH", "/api/v1/campaigns/cmp-1", {"team": "west"}, "team"),
        ("POST", "/api/v1/campaigns", {"name": "Expo", "channel": "event", "owner_id": "u-x"}, "owner_id"),
    ],
)
async def test_marketing_may_not_give_a_campaign_another_owner_or_team(
    gateway: Gateway, method: str, path: str, body: dict[str, str], field: str
) -> None:
    refused = await gateway.client.request(method, path, json=body, headers=gateway.auth("marketing"))

    assert refused.status_code == 403, refused.text
    assert refused.json()["detail"] == f"you may not set field '{field}' of campaigns"
    assert refused.json()["errors"] == [{"field": field, "message": refused.json()["detail"]}]


async def test_a_campaign_a_deal_names_stays_though_the_deal_is_out_of_the_callers_sight(gateway: Gateway) -> None:
    refused = await gateway.client.delete("/api/v1/campaigns/cmp-3", headers=gateway.auth("marketing"))

    assert refused.status_code == 409, refused.text
    assert (refused.json()["reason"], refused.json()["existing_id"]) == ("CAMPAIGN_IN_USE", "o-7")
    assert "end it" in refused.json()["detail"]
    assert gateway.leads.campaign_deletes == []
    assert gateway.sales.deal_lookups == [("cmp-3", RecordScope(ScopeKind.ALL))]


async def test_a_contract_is_deleted_at_its_etags_version_by_who_may_delete_contracts_and_audited_as_it_was(
    gateway: Gateway,
) -> None:
    admin = gateway.auth("admin")

    deleted = await gateway.client.delete("/api/v1/contracts/k-1", headers={**admin, "If-Match": '"2"'})
    elsewhere = await gateway.client.delete("/api/v1/contracts/k-404", headers=admin)
    by_a_manager = await gateway.client.delete("/api/v1/contracts/k-1", headers=gateway.auth("sales_manager"))

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert (elsewhere.status_code, by_a_manager.status_code) == (404, 403)
    assert [(r.id, r.expected_version) for r in gateway.sales.contract_deletes] == [("k-1", 2)]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["record_id"], row["outcome"]) for row in rows] == [
        ("denied", "k-1", "denied"),
        ("denied", "k-404", "denied"),
        ("delete", "k-1", "allowed"),
    ]
    audited = rows[-1]
    assert (audited["resource"], audited["after"]) == ("contracts", None)
    assert (audited["before"]["title"], audited["before"]["status"]) == ("Robots", "pending_approval")


async def test_a_contract_is_terminated_by_finance_or_a_manager_not_by_its_rep(gateway: Gateway) -> None:
    """Terminating writes off what is still owed (the ERP stops dunning it): not a rep's call alone."""
    path = "/api/v1/contracts/k-1/terminate"
    by_the_rep = await gateway.client.post(path, json={"reason": "lost"}, headers=gateway.auth("sales_rep"))
    by_finance = await gateway.client.post(path, json={"reason": "insolvent"}, headers=gateway.auth("finance"))
    by_a_manager = await gateway.client.post(path, json={"reason": "withdrew"}, headers=gateway.auth("sales_manager"))

    assert by_the_rep.status_code == 403, by_the_rep.text
    assert by_the_rep.json()["errors"] == [{"field": "terminated_reason", "message": by_the_rep.json()["detail"]}]
    assert (by_finance.status_code, by_a_manager.status_code) == (200, 200)
    assert by_finance.json()["status"] == "terminated"
    assert [r.reason for r in gateway.sales.contract_terminations] == ["insolvent", "withdrew"]


async def test_a_quote_is_deleted_at_its_etags_version_by_who_may_delete_quotes_and_audited_as_it_was(
    gateway: Gateway,
) -> None:
    admin = gateway.auth("admin")

    deleted = await gateway.client.delete("/api/v1/quotes/q-1", headers={**admin, "If-Match": '"4"'})
    missing = await gateway.client.delete("/api/v1/quotes/q-2", headers=admin)
    by_a_manager = await gateway.client.delete("/api/v1/quotes/q-1", headers=gateway.auth("sales_manager"))

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert (missing.status_code, by_a_manager.status_code) == (404, 403)
    assert [(r.id, r.expected_version) for r in gateway.sales.quote_deletes] == [("q-1", 4)]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["record_id"], row["outcome"]) for row in rows] == [
        ("denied", "q-1", "denied"),
        ("denied", "q-2", "denied"),
        ("delete", "q-1", "allowed"),
    ]
    audited = rows[-1]
    assert (audited["resource"], audited["after"]) == ("quotes", None)
    assert audited["before"]["status"] == "rejected"


def installment(due_date: str, amount: str) -> dict[str, Any]:
    return {"due_date": due_date, "amount": {"amount": amount, "currency": "CNY"}}


async def test_a_plan_is_replaced_by_sending_back_what_get_returned_with_an_installment_added(
    gateway: Gateway,
) -> None:
    finance = gateway.auth("finance")
    plan = (await gateway.client.get("/api/v1/contracts/k-1/payment-plan", headers=finance)).json()
    plan["installments"].append(installment("2027-06-30", "80.00"))

    replaced = await gateway.client.put("/api/v1/contracts/k-1/payment-plan", json=plan, headers=finance)
    unknown = await gateway.client.put(
        "/api/v1/contracts/k-1/payment-plan", json={**plan, "discount": "5"}, headers=finance
    )

    assert replaced.status_code == 200, replaced.text
    sent = gateway.sales.plan_updates[-1]
    assert [(i.due_date, i.amount.amount) for i in sent.installments] == [
        ("2027-01-31", "100.00"),
        ("2027-06-30", "80.00"),
    ]
    assert unknown.status_code == 422 and [e["field"] for e in unknown.json()["errors"]] == ["discount"]


async def test_a_plans_installments_are_replaced_at_its_etags_version_by_who_may_update_plans(
    gateway: Gateway,
) -> None:
    finance = gateway.auth("finance")
    body = {"installments": [installment("2027-01-31", "100.00"), installment("2027-03-31", "50.00")]}

    read = await gateway.client.get("/api/v1/contracts/k-1/payment-plan", headers=finance)
    replaced = await gateway.client.put(
        "/api/v1/contracts/k-1/payment-plan", json=body, headers={**finance, "If-Match": read.headers["etag"]}
    )
    paid = await gateway.client.put(
        "/api/v1/contracts/k-1/payment-plan", json={"installments": [installment("2027-02-28", "150.00")]},
        headers=finance,
    )  # fmt: skip
    elsewhere = await gateway.client.put("/api/v1/contracts/k-404/payment-plan", json=body, headers=finance)
    refused = {
        role: (
            await gateway.client.put("/api/v1/contracts/k-1/payment-plan", json=body, headers=gateway.auth(role))
        ).status_code
        for role in ("sales_manager", "sales_rep", "erp_integration")
    }

    assert (read.headers["etag"], replaced.status_code, replaced.headers["etag"]) == ('"1"', 200, '"2"'), replaced.text
    assert [(i["id"], i["due_date"]) for i in replaced.json()["installments"]] == [
        ("i-1", "2027-01-31"), ("i-2", "2027-03-31"),
    ]  # fmt: skip
    assert paid.status_code == 409, paid.text
    assert (paid.json()["reason"], paid.json()["existing_id"]) == ("INSTALLMENT_PAID", "i-1")
    assert paid.json()["detail"].startswith("installments[0] ")
    assert elsewhere.status_code == 404
    assert refused == {"sales_manager": 403, "sales_rep": 403, "erp_integration": 403}
    assert [(r.contract_id, r.expected_version, len(r.installments)) for r in gateway.sales.plan_updates] == [
        ("k-1", 1, 2), ("k-1", 0, 1),
    ]  # fmt: skip
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery(record_id="pp-1"))
    [audited] = [row for row in rows if row["outcome"] == "allowed"]
    assert (audited["action"], audited["resource"], audited["fields"]) == (
        "update",
        "payment_plans",
        ["installments", "version"],
    )


async def test_a_payment_sends_its_idempotency_key_and_a_reused_one_is_a_422_naming_the_header(
    gateway: Gateway,
) -> None:
    finance = gateway.auth("finance")
    body = {"contract_id": "k-1", "amount": {"amount": "300.00", "currency": "CNY"}, "external_reference": "M-1"}

    first = await gateway.client.post("/api/v1/payments", json=body, headers={**finance, "Idempotency-Key": "p-1"})
    again = await gateway.client.post("/api/v1/payments", json=body, headers={**finance, "Idempotency-Key": "p-1"})
    reused = await gateway.client.post(
        "/api/v1/payments", json={**body, "external_reference": "M-2"}, headers={**finance, "Idempotency-Key": "p-1"}
    )

    assert (first.status_code, again.status_code, again.json()["id"]) == (201, 201, first.json()["id"]), first.text
    assert reused.status_code == 422, reused.text
    assert reused.json()["errors"] == [{"field": "Idempotency-Key", "message": "was used with a different request"}]
    assert list(gateway.sales.payment_keys) == ["p-1"]


LINE = {"product_name": "GTX Basic", "quantity": "2", "unit_price": {"amount": "1000.00", "currency": "CNY"}}


async def test_a_quotes_line_items_change_at_its_etags_version_discounts_only_by_who_may_write_them(
    gateway: Gateway,
) -> None:
    rep, manager = gateway.auth("sales_rep"), gateway.auth("sales_manager")
    discounted = {"line_items": [{**LINE, "discount_percent": "20"}]}

    by_the_rep = await gateway.client.patch(
        "/api/v1/quotes/q-1", json={"line_items": [LINE]}, headers={**rep, "If-Match": '"4"'}
    )
    rep_discount = await gateway.client.patch("/api/v1/quotes/q-1", json=discounted, headers=rep)
    by_the_manager = await gateway.client.patch("/api/v1/quotes/q-1", json=discounted, headers=manager)
    by_finance = await gateway.client.patch("/api/v1/quotes/q-1", json=discounted, headers=gateway.auth("finance"))
    elsewhere = await gateway.client.patch("/api/v1/quotes/q-2", json=discounted, headers=manager)
    nothing = await gateway.client.patch("/api/v1/quotes/q-1", json={"line_items": []}, headers=manager)

    assert (by_the_rep.status_code, by_the_manager.status_code) == (200, 200), by_the_rep.text
    assert by_the_rep.headers["etag"] == '"5"' and by_the_rep.json()["status"] == "pending_approval"
    assert "max_discount_percent" not in by_the_rep.json()  # a rep sees no discounts
    assert by_the_manager.json()["max_discount_percent"] == "20"
    assert rep_discount.status_code == 403, rep_discount.text
    assert rep_discount.json()["errors"][0]["field"] == "line_items.discount_percent"
    assert (by_finance.status_code, elsewhere.status_code, nothing.status_code) == (403, 404, 422)
    assert [(r.expected_version, [i.discount_percent for i in r.line_items]) for r in gateway.sales.quote_updates] == [
        (4, [""]), (0, ["20"]),
    ]  # fmt: skip
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery(record_id="q-1"))
    updates = [(row["before"], row["after"]) for row in rows if row["action"] == "update"]
    assert sorted(after["max_discount_percent"] for _, after in updates) == ["0", "20"]
    assert {(before["status"], after["status"]) for before, after in updates} == {("rejected", "pending_approval")}


async def test_a_quote_with_discounts_gets_new_line_items_only_from_who_may_set_discounts(gateway: Gateway) -> None:
    """Its discounts are hidden from a rep, whose new line items would drop them unseen."""
    by_the_rep = await gateway.client.patch(
        "/api/v1/quotes/q-3", json={"line_items": [LINE]}, headers=gateway.auth("sales_rep")
    )
    by_the_manager = await gateway.client.patch(
        "/api/v1/quotes/q-3", json={"line_items": [LINE]}, headers=gateway.auth("sales_manager")
    )

    assert by_the_rep.status_code == 403, by_the_rep.text
    assert by_the_rep.json()["errors"][0]["field"] == "line_items.discount_percent"
    assert by_the_manager.status_code == 200, by_the_manager.text
    assert len(gateway.sales.quote_updates) == 1  # the manager's


async def test_new_line_items_of_a_deal_carry_where_the_caller_may_replace_discounts(gateway: Gateway) -> None:
    """The service refuses new line items on a deal with discounts unless the caller may set
    discounts there: a rep (who sees none) sends no such scope, a manager their team's."""
    for role, body in [
        ("sales_rep", {"line_items": [LINE]}),
        ("sales_manager", {"line_items": [LINE]}),
        ("sales_manager", {"name": "Robots II"}),
    ]:
        response = await gateway.client.patch("/api/v1/opportunities/o-1", json=body, headers=gateway.auth(role))
        assert response.status_code == 200, response.text

    sent = [
        RecordScope.from_proto(r.discounts_scope) if r.HasField("discounts_scope") else None
        for r in gateway.sales.updates
    ]
    assert sent == [None, RecordScope(ScopeKind.TEAM, owner_id="u-1", team="east", region="north"), None]


async def test_a_deal_is_handed_over_at_its_etags_version_by_who_may_assign_deals_and_audited(
    gateway: Gateway,
) -> None:
    manager = gateway.auth("sales_manager")

    assigned = await gateway.client.post(
        "/api/v1/opportunities/o-1/assign",
        json={"owner_id": "u-2", "team": "west"},
        headers={**manager, "If-Match": '"5"'},
    )
    elsewhere = await gateway.client.post(
        "/api/v1/opportunities/o-404/assign", json={"owner_id": "u-2"}, headers=manager
    )
    by_a_rep = await gateway.client.post(
        "/api/v1/opportunities/o-1/assign", json={"owner_id": "u-2"}, headers=gateway.auth("sales_rep")
    )
    by_finance = await gateway.client.post(
        "/api/v1/opportunities/o-1/assign", json={"owner_id": "u-2"}, headers=gateway.auth("finance")
    )
    nobody = await gateway.client.post("/api/v1/opportunities/o-1/assign", json={"owner_id": " "}, headers=manager)

    assert assigned.status_code == 200, assigned.text
    assert (assigned.headers["etag"], assigned.json()["owner_id"], assigned.json()["team"]) == ('"6"', "u-2", "west")
    assert (elsewhere.status_code, by_a_rep.status_code, by_finance.status_code) == (404, 403, 403)
    assert (nobody.status_code, nobody.json()["errors"][0]["field"]) == (422, "owner_id")
    assert [(r.id, r.expected_version, r.owner_id, r.team, r.region) for r in gateway.sales.assignments] == [
        ("o-1", 5, "u-2", "west", "")
    ]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery(record_id="o-1"))
    [audited] = [row for row in rows if row["outcome"] == "allowed"]
    assert (audited["action"], audited["resource"], audited["fields"]) == (
        "assign",
        "opportunities",
        ["owner_id", "team", "version"],
    )
    assert (audited["before"], audited["after"]) == (
        {"owner_id": "", "team": "", "version": 5},
        {"owner_id": "u-2", "team": "west", "version": 6},
    )


async def test_only_who_may_write_a_deals_owner_changes_it_through_patch(gateway: Gateway) -> None:
    by_a_rep = await gateway.client.patch(
        "/api/v1/opportunities/o-1", json={"owner_id": "u-2"}, headers=gateway.auth("sales_rep")
    )
    by_a_manager = await gateway.client.patch(
        "/api/v1/opportunities/o-1", json={"owner_id": "u-2"}, headers=gateway.auth("sales_manager")
    )

    assert by_a_rep.status_code == 403, by_a_rep.text
    assert by_a_rep.json()["errors"][0]["field"] == "owner_id"
    assert by_a_manager.status_code == 200, by_a_manager.text
    assert [list(r.update_mask.paths) for r in gateway.sales.updates] == [["owner_id"]]  # the rep's never left


@pytest.mark.parametrize(
    ("charset", "encoding"),
    [("gbk", "gbk"), ("GB18030", "gb18030"), ("utf-16", "utf-16")],  # Excel/WPS exports on Chinese Windows
)
async def test_an_import_in_a_declared_charset_reaches_the_service_as_utf8(
    gateway: Gateway, charset: str, encoding: str
) -> None:
    text = "Full Name,Phone Number,Company\n张三,13800138000,上海星光\n"
    response = await gateway.client.post(
        "/api/v1/leads/import",
        content=text.encode(encoding),
        headers={**gateway.auth("sales_rep"), "Content-Type": f"text/csv; charset={charset}"},
    )

    assert response.status_code == 200, response.text
    [(header, content)] = gateway.leads.imports
    assert content.decode("utf-8") == text
    # The size the service checks against its byte limit before importing a row: of what it reads.
    assert header.part_bytes == len(text.encode()) != len(text.encode(encoding))


@pytest.mark.parametrize(
    ("content_type", "body", "field"),
    [
        ("text/csv; charset=klingon", b"name\nLi\n", "content-type"),
        # A part cut inside a two-byte character: parts must be split at line ends.
        ("text/csv; charset=gbk", "name\n张三".encode("gbk")[:-1], "file"),
    ],
)
async def test_an_import_whose_charset_does_not_read_is_refused_naming_why(
    gateway: Gateway, content_type: str, body: bytes, field: str
) -> None:
    response = await gateway.client.post(
        "/api/v1/leads/import", content=body, headers={**gateway.auth("sales_rep"), "Content-Type": content_type}
    )

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"].endswith(field)
    assert gateway.leads.imports == []


async def test_metrics_are_not_served_on_the_public_api_port(gateway: Gateway) -> None:
    """They are on `CRM_GATEWAY_METRICS_PORT`, which no Ingress exposes."""
    assert (await gateway.client.get("/metrics")).status_code == 404


async def test_who_runs_campaigns_turns_a_web_form_off_and_replaces_its_key(gateway: Gateway) -> None:
    marketing, rep = gateway.auth("marketing"), gateway.auth("sales_rep")

    off = await gateway.client.patch("/api/v1/webforms/w-1", json={"enabled": False}, headers=marketing)
    rotated = await gateway.client.post("/api/v1/webforms/w-1/rotate-key", headers=marketing)
    refused = await gateway.client.post("/api/v1/webforms/w-1/rotate-key", headers=rep)

    renamed = await gateway.client.patch(
        "/api/v1/webforms/w-1", json={"name": "Expo 2027", "honeypot_field": "fax"}, headers=marketing
    )
    nothing = await gateway.client.patch("/api/v1/webforms/w-1", json={}, headers=marketing)

    assert off.status_code == 200 and off.json()["enabled"] is False
    assert rotated.status_code == 200 and rotated.json()["form_key"] == "k-2"
    assert refused.status_code == 403
    assert renamed.status_code == 200 and (renamed.json()["name"], renamed.json()["honeypot_field"]) == (
        "Expo 2027",
        "fax",
    )
    assert renamed.json()["rate_limit_per_minute"] == 60 and renamed.json()["enabled"] is True  # not named: kept
    assert nothing.status_code == 422
    actions = [e["action"] for e in (await gateway.app.state.security.audit.query(AuditQuery(record_id="w-1")))[0]]
    # The form's trail: the writes, and the refused attempt on it.
    assert sorted(actions) == ["denied", "disable_webform", "rotate_webform_key", "update_webform"]


async def test_a_web_forms_writes_send_if_match_and_idempotency_key_and_answer_with_its_version(
    gateway: Gateway,
) -> None:
    marketing = gateway.auth("marketing")

    read = await gateway.client.get("/api/v1/webforms/w-1", headers=marketing)
    patched = await gateway.client.patch(
        "/api/v1/webforms/w-1", json={"name": "Expo 2027"}, headers={**marketing, "If-Match": read.headers["etag"]}
    )
    rotated = await gateway.client.post(
        "/api/v1/webforms/w-1/rotate-key",
        headers={**marketing, "If-Match": patched.headers["etag"], "Idempotency-Key": "rotate-1"},
    )

    assert (read.status_code, patched.status_code, rotated.status_code) == (200, 200, 200)
    assert (read.headers["etag"], patched.headers["etag"], rotated.headers["etag"]) == ('"3"', '"4"', '"5"')
    assert read.json()["version"] == 3
    update, rotation = gateway.leads.webform_writes
    assert update.expected_version == 3
    assert (rotation.expected_version, rotation.idempotency_key) == (4, "rotate-1")


async def test_a_campaign_reads_with_its_version_a_number_and_no_dates_as_null(gateway: Gateway) -> None:
    response = await gateway.client.get("/api/v1/campaigns/cmp-1", headers=gateway.auth("marketing"))

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], response.headers["etag"]) == (3, '"3"')
    assert (body["starts_on"], body["ends_on"], body["cost"]) == (None, None, None)


async def test_a_follow_up_on_a_lead_needs_the_grant_to_create_activities(gateway: Gateway) -> None:
    """Marketing may update any lead (scope all) but log no activity: a call it logged would mark
    a rep's lead contacted and close its first-contact task."""
    response = await gateway.client.post(
        "/api/v1/leads/l-1/activities", json={"kind": "call"}, headers=gateway.auth("marketing")
    )

    assert response.status_code == 403, response.text
    assert "activities" in response.json()["detail"]
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert [(row["action"], row["outcome"]) for row in rows] == [("denied", "denied")]


@pytest.mark.parametrize(("role", "status"), [("marketing", 403), ("sales_rep", 200)])
async def test_a_status_move_needs_the_grant_to_log_a_follow_up(gateway: Gateway, role: str, status: int) -> None:
    """Setting `contacted` records the first contact and closes the rep's SLA task: marketing, which
    may update leads but not log activities, may not claim one that way either."""
    response = await gateway.client.patch("/api/v1/leads/l-1", json={"status": "contacted"}, headers=gateway.auth(role))

    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["errors"][0]["field"] == "status"


async def test_an_import_part_sent_again_is_audited_as_a_replay(gateway: Gateway) -> None:
    body = "name,phone\nLi,138\n"
    first = await post_import(gateway, body, import_key="k", part=1, final="true")
    again = await post_import(gateway, body, import_key="k", part=1, final="true")

    assert (first.status_code, again.status_code) == (200, 200)
    rows, _ = await gateway.app.state.security.audit.query(AuditQuery())
    assert sorted(row["action"] for row in rows) == ["import", "replay"]


async def test_a_web_forms_key_is_answered_to_its_creator_but_kept_out_of_the_audit_trail(gateway: Gateway) -> None:
    marketing = gateway.auth("marketing")

    created = await gateway.client.post("/api/v1/webforms", json={"name": "Expo"}, headers=marketing)
    renamed = await gateway.client.patch("/api/v1/webforms/w-1", json={"name": "Expo 2027"}, headers=marketing)

    assert created.json()["form_key"] == "k" * 16 and renamed.status_code == 200
    rows = (await gateway.app.state.security.audit.query(AuditQuery()))[0]
    assert [row["action"] for row in rows if row["action"] != "read_sensitive"] == ["update_webform", "create_webform"]
    assert all("form_key" not in (row["before"] or {}) | (row["after"] or {}) for row in rows)
    assert "k" * 16 not in str(rows)


@pytest.mark.parametrize(
    ("role", "resource", "field", "path", "body"),
    [
        ("sales_rep", "activities", "notes", "/accounts/a-1/activities", {"kind": "call", "notes": "Met the CFO"}),
        ("service_manager", "tickets", "assignee_id", "/tickets/t-1/assign", {"assignee_id": "agent-2"}),
        ("sales_manager", "accounts", "team", "/accounts/a-1/transfer", {"new_owner_id": "u-2", "new_team": "west"}),
        (
            "sales_manager",
            "accounts",
            "team",
            "/accounts:transfer",
            {"from_owner_id": "u-1", "to_owner_id": "u-2", "to_team": "west"},
        ),
    ],
)
async def test_a_field_a_custom_policy_makes_read_only_is_refused_on_every_route_that_writes_it(
    tmp_path: Path, migrated_sqlite: Path, role: str, resource: str, field: str, path: str, body: dict[str, Any]
) -> None:
    document = default_policy_document()
    grant_fields(role, resource, **{field: "read"})(document)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(document))
    async with started_gateway(tmp_path, migrated_sqlite, policy_path=str(policy)) as gateway:
        response = await gateway.client.post(f"/api/v1{path}", json=body, headers=gateway.auth(role))
    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["field"] == field
