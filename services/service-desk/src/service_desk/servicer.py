"""gRPC <-> handler translation for crm.servicedesk.v1.ServiceDeskService (no business rules here)."""

from typing import Any

from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceServicer
from crm_platform.changes import previous_message
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.structs import struct_values
from crm_platform.timeutil import from_timestamp
from crm_platform.update_mask import writable_paths

from service_desk import handlers
from service_desk.handlers import AGENT_FIELDS, ARTICLE_FIELDS, TICKET_FIELDS, Context, Page
from service_desk.messages import (
    agent_to_proto,
    article_to_proto,
    comment_to_proto,
    csat_to_proto,
    return_visit_to_proto,
    sla_policy_to_proto,
    survey_to_proto,
    ticket_answer,
    work_log_to_proto,
)
from service_desk.repository import TicketFilter

Ctx = Any  # grpc.aio.ServicerContext; grpc is untyped here


def _page(page: Any) -> Page:
    return Page(limit=page.limit, cursor=page.cursor, sort=page.sort)


def _info(cursor: str) -> common_pb2.PageInfo:
    return common_pb2.PageInfo(next_cursor=cursor)


def _masked(message: Any, mask: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The fields an update mask names, read from the input message."""
    return {path: _plain(getattr(message, path)) for path in writable_paths(mask.paths, allowed)}


def _plain(value: Any) -> Any:
    return list(value) if hasattr(value, "extend") else value


def _bool_filter(text: str, field: str) -> bool | None:
    if text not in ("", "true", "false"):
        raise ValidationFailed([FieldError(field, "must be true or false")])
    return None if text == "" else text == "true"


def ticket_values(message: pb.TicketInput) -> dict[str, Any]:
    values = {name: _plain(getattr(message, name)) for name in TICKET_FIELDS if name != "custom"}
    values["custom"] = struct_values(message.custom)
    return values


def ticket_update(message: pb.TicketInput, mask: Any) -> dict[str, Any]:
    """The fields the mask names; `custom.<key>` writes one custom field (absent in the input: removed)."""
    paths = writable_paths(mask.paths, TICKET_FIELDS, keyed=True)
    given = ticket_values(message)
    selected: dict[str, Any] = {}
    for path in paths:
        head, _, key = path.partition(".")
        if head == "custom" and key:
            selected.setdefault("custom", {})[key] = given["custom"].get(key)
        else:
            selected[head] = given[head]
    return selected


class ServiceDeskServicer(ServiceDeskServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # tickets

    async def CreateTicket(self, request: pb.CreateTicketRequest, context: Ctx) -> pb.CreateTicketResponse:
        row, suggestions = await handlers.create_ticket(
            self.ctx,
            ticket_values(request.ticket),
            idempotency_key=request.idempotency_key,
            skip_dispatch=request.skip_dispatch,
        )
        return pb.CreateTicketResponse(
            ticket=ticket_answer(row), suggested_articles=[article_to_proto(a) for a in suggestions]
        )

    async def GetTicket(self, request: pb.GetTicketRequest, context: Ctx) -> pb.GetTicketResponse:
        row, comments, entries, csat = await handlers.get_ticket(self.ctx, request.ticket_id)
        response = pb.GetTicketResponse(
            ticket=ticket_answer(row),
            comments=[comment_to_proto(c) for c in comments],
            work_log=[work_log_to_proto(e) for e in entries],
        )
        if csat is not None:
            response.csat.CopyFrom(csat_to_proto(csat))
        return response

    async def UpdateTicket(self, request: pb.UpdateTicketRequest, context: Ctx) -> pb.UpdateTicketResponse:
        values = ticket_update(request.ticket, request.update_mask)
        change = await handlers.update_ticket(
            self.ctx, request.ticket_id, values, expected_version=request.expected_version
        )
        return pb.UpdateTicketResponse(
            ticket=ticket_answer(change.record), previous=previous_message(ticket_answer, change.previous)
        )

    async def ListTickets(self, request: pb.ListTicketsRequest, context: Ctx) -> pb.ListTicketsResponse:
        f = TicketFilter(
            account_id=request.account_id,
            contact_id=request.contact_id,
            statuses=list(request.statuses),
            priorities=list(request.priorities),
            channels=list(request.channels),
            categories=list(request.categories),
            assignee_id=request.assignee_id,
            region=request.region,
            escalated=_bool_filter(request.escalated, "escalated"),
            created_after=from_timestamp(request.created_after) if request.HasField("created_after") else None,
            q=request.q,
        )
        custom = [(c.key, c.value) for c in request.custom]
        rows, cursor = await handlers.list_tickets(self.ctx, f, _page(request.page), custom)
        return pb.ListTicketsResponse(items=[ticket_answer(r) for r in rows], page_info=_info(cursor))

    async def ChangeTicketStatus(
        self, request: pb.ChangeTicketStatusRequest, context: Ctx
    ) -> pb.ChangeTicketStatusResponse:
        change = await handlers.change_status(
            self.ctx, request.ticket_id, request.status, expected_version=request.expected_version, note=request.note
        )
        return pb.ChangeTicketStatusResponse(
            ticket=ticket_answer(change.record), previous=previous_message(ticket_answer, change.previous)
        )

    async def AssignTicket(self, request: pb.AssignTicketRequest, context: Ctx) -> pb.AssignTicketResponse:
        change = await handlers.assign_ticket(
            self.ctx, request.ticket_id, request.assignee_id, expected_version=request.expected_version
        )
        return pb.AssignTicketResponse(
            ticket=ticket_answer(change.record), previous=previous_message(ticket_answer, change.previous)
        )

    async def AddTicketComment(self, request: pb.AddTicketCommentRequest, context: Ctx) -> pb.AddTicketCommentResponse:
        row = await handlers.add_comment(
            self.ctx, request.ticket_id, request.body, public=request.public, idempotency_key=request.idempotency_key
        )
        return pb.AddTicketCommentResponse(comment=comment_to_proto(row))

    async def LogWork(self, request: pb.LogWorkRequest, context: Ctx) -> pb.LogWorkResponse:
        row = await handlers.log_work(
            self.ctx, request.ticket_id, request.minutes, request.note, idempotency_key=request.idempotency_key
        )
        return pb.LogWorkResponse(entry=work_log_to_proto(row))

    async def DeleteTicket(self, request: pb.DeleteTicketRequest, context: Ctx) -> pb.DeleteTicketResponse:
        deleted = await handlers.delete_ticket(self.ctx, request.ticket_id, expected_version=request.expected_version)
        return pb.DeleteTicketResponse(previous=ticket_answer(deleted))

    # SLA policies

    async def ListSlaPolicies(self, request: pb.ListSlaPoliciesRequest, context: Ctx) -> pb.ListSlaPoliciesResponse:
        return pb.ListSlaPoliciesResponse(
            items=[sla_policy_to_proto(r) for r in await handlers.list_sla_policies(self.ctx)]
        )

    async def UpdateSlaPolicy(self, request: pb.UpdateSlaPolicyRequest, context: Ctx) -> pb.UpdateSlaPolicyResponse:
        change = await handlers.update_sla_policy(
            self.ctx,
            request.priority,
            request.first_response_minutes,
            request.resolution_minutes,
            expected_version=request.expected_version,
        )
        return pb.UpdateSlaPolicyResponse(
            policy=sla_policy_to_proto(change.record), previous=previous_message(sla_policy_to_proto, change.previous)
        )

    # agents

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: Ctx) -> pb.CreateAgentResponse:
        values = {name: _plain(getattr(request.agent, name)) for name in ("id", *AGENT_FIELDS)}
        row, open_tickets = await handlers.create_agent(self.ctx, values, idempotency_key=request.idempotency_key)
        return pb.CreateAgentResponse(agent=agent_to_proto(row, open_tickets))

    async def GetAgent(self, request: pb.GetAgentRequest, context: Ctx) -> pb.GetAgentResponse:
        row, open_tickets = await handlers.get_agent(self.ctx, request.agent_id)
        return pb.GetAgentResponse(agent=agent_to_proto(row, open_tickets))

    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: Ctx) -> pb.UpdateAgentResponse:
        values = _masked(request.agent, request.update_mask, AGENT_FIELDS)
        change = await handlers.update_agent(
            self.ctx, request.agent_id, values, expected_version=request.expected_version
        )
        return pb.UpdateAgentResponse(
            agent=agent_to_proto(*change.record),
            previous=previous_message(lambda agent: agent_to_proto(*agent), change.previous),
        )

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Ctx) -> pb.ListAgentsResponse:
        rows, cursor = await handlers.list_agents(
            self.ctx,
            region=request.region,
            skill=request.skill,
            available=_bool_filter(request.available, "available"),
            team=request.team,
            page=_page(request.page),
        )
        return pb.ListAgentsResponse(items=[agent_to_proto(r, n) for r, n in rows], page_info=_info(cursor))

    # CSAT and return visits

    async def SubmitCsat(self, request: pb.SubmitCsatRequest, context: Ctx) -> pb.SubmitCsatResponse:
        row = await handlers.submit_csat(
            self.ctx, request.ticket_id, request.score, request.comment, idempotency_key=request.idempotency_key
        )
        return pb.SubmitCsatResponse(response=csat_to_proto(row))

    async def GetCsatSurvey(self, request: pb.GetCsatSurveyRequest, context: Ctx) -> pb.GetCsatSurveyResponse:
        survey = await handlers.get_csat_survey(self.ctx, request.survey_key)
        return pb.GetCsatSurveyResponse(survey=survey_to_proto(survey))

    async def SubmitCsatSurvey(self, request: pb.SubmitCsatSurveyRequest, context: Ctx) -> pb.SubmitCsatSurveyResponse:
        row = await handlers.submit_csat_survey(
            self.ctx, request.survey_key, request.score, request.comment, idempotency_key=request.idempotency_key
        )
        return pb.SubmitCsatSurveyResponse(response=csat_to_proto(row))

    async def ListCsatResponses(
        self, request: pb.ListCsatResponsesRequest, context: Ctx
    ) -> pb.ListCsatResponsesResponse:
        rows, cursor = await handlers.list_csat(
            self.ctx, ticket_id=request.ticket_id, account_id=request.account_id, page=_page(request.page)
        )
        return pb.ListCsatResponsesResponse(items=[csat_to_proto(r) for r in rows], page_info=_info(cursor))

    async def ListReturnVisits(self, request: pb.ListReturnVisitsRequest, context: Ctx) -> pb.ListReturnVisitsResponse:
        rows, cursor = await handlers.list_return_visits(
            self.ctx,
            account_id=request.account_id,
            status=request.status,
            assignee_id=request.assignee_id,
            due_before=from_timestamp(request.due_before) if request.HasField("due_before") else None,
            page=_page(request.page),
        )
        return pb.ListReturnVisitsResponse(items=[return_visit_to_proto(r) for r in rows], page_info=_info(cursor))

    async def CompleteReturnVisit(
        self, request: pb.CompleteReturnVisitRequest, context: Ctx
    ) -> pb.CompleteReturnVisitResponse:
        row = await handlers.complete_return_visit(self.ctx, request.return_visit_id, request.notes)
        return pb.CompleteReturnVisitResponse(return_visit=return_visit_to_proto(row))

    # knowledge base

    async def CreateKbArticle(self, request: pb.CreateKbArticleRequest, context: Ctx) -> pb.CreateKbArticleResponse:
        values = {name: _plain(getattr(request.article, name)) for name in ARTICLE_FIELDS}
        row = await handlers.create_article(self.ctx, values, idempotency_key=request.idempotency_key)
        return pb.CreateKbArticleResponse(article=article_to_proto(row))

    async def GetKbArticle(self, request: pb.GetKbArticleRequest, context: Ctx) -> pb.GetKbArticleResponse:
        return pb.GetKbArticleResponse(
            article=article_to_proto(await handlers.get_article(self.ctx, request.article_id))
        )

    async def UpdateKbArticle(self, request: pb.UpdateKbArticleRequest, context: Ctx) -> pb.UpdateKbArticleResponse:
        values = _masked(request.article, request.update_mask, ARTICLE_FIELDS)
        change = await handlers.update_article(
            self.ctx, request.article_id, values, expected_version=request.expected_version
        )
        return pb.UpdateKbArticleResponse(
            article=article_to_proto(change.record), previous=previous_message(article_to_proto, change.previous)
        )

    async def SearchKbArticles(self, request: pb.SearchKbArticlesRequest, context: Ctx) -> pb.SearchKbArticlesResponse:
        rows, cursor = await handlers.search_articles(
            self.ctx,
            request.q,
            category=request.category,
            limit=request.page.limit or request.limit,
            include_unpublished=request.include_unpublished,
            cursor=request.page.cursor,
        )
        return pb.SearchKbArticlesResponse(items=[article_to_proto(r) for r in rows], page_info=_info(cursor))

    async def SuggestKbArticles(
        self, request: pb.SuggestKbArticlesRequest, context: Ctx
    ) -> pb.SuggestKbArticlesResponse:
        rows = await handlers.suggest_articles(self.ctx, request.ticket_id, request.limit)
        return pb.SuggestKbArticlesResponse(items=[article_to_proto(r) for r in rows])
