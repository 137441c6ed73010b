"""gRPC <-> use cases: request messages to handler arguments, results to response messages."""

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2, leads_service_pb2, leads_service_pb2_grpc
from crm_platform.changes import previous_message
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.money import Money, money_from_proto
from crm_platform.principal import RecordScope, ScopeKind, current_principal, resource_scope_from_metadata
from crm_platform.structs import struct_values
from crm_platform.timeutil import from_timestamp, to_timestamp
from sqlalchemy.engine import RowMapping

from leads import messages
from leads.domain import AssignmentRule, EngagementInput, ScoringRule, TaskFilters, Thresholds
from leads.handlers import (
    WEBFORM_SETTINGS,
    ActivityInput,
    ConversionScopes,
    ConvertRequest,
    ImportOptions,
    ImportRowOutcome,
    ImportSpec,
    LeadFilters,
    LeadsService,
    RateLimited,
)
from leads.importing import FORMATS, RowMapper

LEAD_INPUT_FIELDS = tuple(f.name for f in leads_service_pb2.LeadInput.DESCRIPTOR.fields)


def _conversion_scopes(context: grpc.aio.ServicerContext) -> ConversionScopes:
    """The caller's scope on each resource a conversion writes, as the gateway sends them. One not
    sent is the caller's own records, as for the call's own scope (crm_platform.principal)."""
    metadata = context.invocation_metadata()
    own = ConversionScopes.own(current_principal())
    return ConversionScopes(
        accounts=resource_scope_from_metadata(metadata, "accounts") or own.accounts,
        contacts=resource_scope_from_metadata(metadata, "contacts") or own.contacts,
        opportunities=resource_scope_from_metadata(metadata, "opportunities") or own.opportunities,
    )


def _scope_on(resource: str, context: grpc.aio.ServicerContext) -> RecordScope:
    """The caller's scope on another `resource` than the call's own, sent along with it: on leads
    with an activity's edit (whose own scope is the caller's on activities), on tasks with the
    worklist across leads (whose own scope is the caller's on leads). Their own records when not
    sent, as for the call's own scope."""
    sent = resource_scope_from_metadata(context.invocation_metadata(), resource)
    return sent or RecordScope(ScopeKind.OWN, owner_id=current_principal().user_id)


def _optional_bool(text: str, field: str) -> bool | None:
    """A "true"/"false" filter; empty (None) means either."""
    value = {"": None, "true": True, "false": False}.get(text.lower())
    if text and value is None:
        raise ValidationFailed([FieldError(field, "must be true or false")])
    return value


def _webform_settings(webform: leads_pb2.Webform) -> dict[str, Any]:
    return {name: getattr(webform, name) for name in WEBFORM_SETTINGS}


def lead_input(message: leads_service_pb2.LeadInput, paths: list[str] | None = None) -> dict[str, Any]:
    """The fields of a LeadInput that were given: all non-empty ones, or exactly `paths` on update."""
    names = paths if paths is not None else [n for n in LEAD_INPUT_FIELDS if n in _given(message)]
    data: dict[str, Any] = {}
    for name in names:
        if name not in LEAD_INPUT_FIELDS:
            data[name] = None  # the handler names it as not writable
        elif name == "custom":
            data[name] = struct_values(message.custom)
        elif name == "tags":
            data[name] = list(message.tags)
        else:
            data[name] = getattr(message, name)
    return data


def _given(message: leads_service_pb2.LeadInput) -> set[str]:
    return {descriptor.name for descriptor, _ in message.ListFields()}


def _money(message: common_pb2.Money, field: str, present: bool) -> Money | None:
    return money_from_proto(message, field=field) if present else None


def _row_result(o: ImportRowOutcome) -> leads_service_pb2.ImportRowResult:
    return leads_service_pb2.ImportRowResult(
        row=o.row, status=o.status, lead_id=o.lead_id, reason=o.reason, field=o.field
    )


def _import_message(row: Mapping[Any, Any], rejections: list[RowMapping]) -> leads_service_pb2.LeadImport:
    return leads_service_pb2.LeadImport(
        id=row["id"],
        status=row["status"],
        progress=leads_service_pb2.ImportProgress(
            rows_seen=row["rows_seen"],
            accepted=row["accepted"],
            merged=row["merged"],
            rejected=row["rejected"],
            skipped=row["skipped"],
        ),
        started_at=to_timestamp(row["started_at"]),
        finished_at=to_timestamp(row["finished_at"]),
        error=row["error"],
        parts_received=row["parts_received"],
        updated_at=to_timestamp(row["updated_at"]),
        owner_id=row["owner_id"],
        format=row["format"],
        rejected_rows=[
            leads_service_pb2.ImportRowResult(
                row=r["row"], status="rejected", lead_id=r["lead_id"], reason=r["reason"], field=r["field"]
            )
            for r in rejections
        ],
    )


class LeadsServicer(leads_service_pb2_grpc.LeadsServiceServicer):
    def __init__(self, service: LeadsService) -> None:
        self.service = service

    # --- leads ---

    async def CreateLead(
        self, request: leads_service_pb2.CreateLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.CreateLeadResponse:
        capture = await self.service.capture_lead(
            lead_input(request.lead), on_duplicate=request.on_duplicate, idempotency_key=request.idempotency_key
        )
        return leads_service_pb2.CreateLeadResponse(
            lead=messages.lead_to_proto(capture.lead),
            merged=capture.merged,
            previous=previous_message(messages.lead_to_proto, capture.previous),
        )

    async def GetLead(
        self, request: leads_service_pb2.GetLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetLeadResponse:
        return leads_service_pb2.GetLeadResponse(
            lead=messages.lead_to_proto(await self.service.get_lead(request.lead_id))
        )

    async def UpdateLead(
        self, request: leads_service_pb2.UpdateLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateLeadResponse:
        paths = list(request.update_mask.paths)
        change = await self.service.update_lead(
            request.lead_id, lead_input(request.lead, paths), paths, request.expected_version
        )
        return leads_service_pb2.UpdateLeadResponse(
            lead=messages.lead_to_proto(change.record),
            previous=previous_message(messages.lead_to_proto, change.previous),
        )

    async def ListLeads(
        self, request: leads_service_pb2.ListLeadsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadsResponse:
        filters = LeadFilters(
            statuses=list(request.statuses),
            sources=list(request.sources),
            owner_id=request.owner_id,
            team=request.team,
            region=request.region,
            industry=request.industry,
            grade=request.grade,
            campaign_id=request.campaign_id,
            tag=request.tag,
            q=request.q,
            q_fields=list(request.q_fields),
            created_after=from_timestamp(request.created_after),
            created_before=from_timestamp(request.created_before),
            source_detail=request.source_detail,
            in_pool=_optional_bool(request.in_pool, "in_pool"),
            follow_up_overdue=_optional_bool(request.follow_up_overdue, "follow_up_overdue"),
            min_score=request.min_score,
            custom=[(c.key, c.value) for c in request.custom],
        )
        rows, cursor = await self.service.list_leads(
            filters, limit=request.page.limit, cursor=request.page.cursor, sort=request.page.sort
        )
        return leads_service_pb2.ListLeadsResponse(
            items=[messages.lead_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def SummarizeLeads(
        self, request: leads_service_pb2.SummarizeLeadsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.SummarizeLeadsResponse:
        counts, total = await self.service.summarize(request.group_by, list(request.statuses), request.import_id)
        return leads_service_pb2.SummarizeLeadsResponse(
            counts=[leads_service_pb2.LeadCount(key=k, count=n) for k, n in counts], total=total
        )

    # --- import ---

    async def ImportLeads(
        self,
        request_iterator: AsyncIterator[leads_service_pb2.ImportLeadsRequest],
        context: grpc.aio.ServicerContext,
    ) -> leads_service_pb2.ImportLeadsResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise ValidationFailed([FieldError("header", "the first message of an import is its header")])
        header = first.header
        on_duplicate = header.on_duplicate or "reject"
        if on_duplicate not in ("reject", "merge", "allow"):
            raise ValidationFailed([FieldError("on_duplicate", f"{on_duplicate!r} is not one of reject, merge, allow")])
        if header.part < 0:
            raise ValidationFailed([FieldError("part", "must not be negative")])
        if header.part_bytes < 0:
            raise ValidationFailed([FieldError("part_bytes", "must not be negative")])
        fmt = header.format or "csv"
        if fmt not in FORMATS:
            raise ValidationFailed([FieldError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")])
        mapper = RowMapper(
            column_map=dict(header.column_map),
            source_map=dict(header.source_map),
            default_source=header.default_source or "import",
            campaign_id=header.campaign_id,
        )
        spec = ImportSpec(
            import_id=header.import_key or new_id(),
            format=fmt,
            options=ImportOptions(mapper=mapper, on_duplicate=on_duplicate, assign=header.assign),
            part=header.part,
            final=header.final,
            part_bytes=header.part_bytes,
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                yield message.chunk

        result = await self.service.import_part(spec, chunks())
        summary = _import_message(result.lead_import, [])
        rows = [_row_result(o) for o in result.outcomes if header.report_accepted or o.status != "accepted"]
        return leads_service_pb2.ImportLeadsResponse(lead_import=summary, rows=rows)

    async def GetLeadImport(
        self, request: leads_service_pb2.GetLeadImportRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetLeadImportResponse:
        row, rejections, cursor = await self.service.import_rejections(
            request.import_id, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.GetLeadImportResponse(
            lead_import=_import_message(row, rejections), page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def ListLeadImports(
        self, request: leads_service_pb2.ListLeadImportsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadImportsResponse:
        rows, cursor = await self.service.list_imports(
            status=request.status, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListLeadImportsResponse(
            items=[_import_message(row, []) for row in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    # --- activities, tasks, scores ---

    async def LogLeadActivity(
        self, request: leads_service_pb2.LogLeadActivityRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.LogLeadActivityResponse:
        logged = await self.service.record_activity(
            ActivityInput(
                lead_id=request.lead_id,
                kind=request.kind,
                outcome=request.outcome,
                notes=request.notes,
                occurred_at=from_timestamp(request.occurred_at),
                next_follow_up_at=from_timestamp(request.next_follow_up_at),
                idempotency_key=request.idempotency_key,
            )
        )
        return leads_service_pb2.LogLeadActivityResponse(
            activity=messages.activity_to_proto(logged.activity),
            lead=messages.lead_to_proto(logged.lead),
            previous=previous_message(messages.lead_to_proto, logged.previous),
        )

    async def ListLeadActivities(
        self, request: leads_service_pb2.ListLeadActivitiesRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadActivitiesResponse:
        rows, cursor = await self.service.list_activities(
            request.lead_id, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListLeadActivitiesResponse(
            items=[messages.activity_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def UpdateLeadActivity(
        self, request: leads_service_pb2.UpdateLeadActivityRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateLeadActivityResponse:
        activity = request.activity
        data = {
            "kind": activity.kind,
            "outcome": activity.outcome,
            "notes": activity.notes,
            "occurred_at": from_timestamp(activity.occurred_at),
            "next_follow_up_at": from_timestamp(activity.next_follow_up_at),
        }
        before, after = await self.service.update_activity(
            request.lead_id,
            request.activity_id,
            data,
            list(request.update_mask.paths),
            request.expected_version,
            leads_scope=_scope_on("leads", context),
        )
        return leads_service_pb2.UpdateLeadActivityResponse(
            activity=messages.activity_to_proto(after), previous=messages.activity_to_proto(before)
        )

    async def DeleteLeadActivity(
        self, request: leads_service_pb2.DeleteLeadActivityRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DeleteLeadActivityResponse:
        deleted = await self.service.delete_activity(
            request.lead_id, request.activity_id, request.expected_version, leads_scope=_scope_on("leads", context)
        )
        return leads_service_pb2.DeleteLeadActivityResponse(activity=messages.activity_to_proto(deleted))

    async def ListLeadTasks(
        self, request: leads_service_pb2.ListLeadTasksRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadTasksResponse:
        rows, cursor = await self.service.list_tasks(
            request.lead_id, request.status, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListLeadTasksResponse(
            items=[messages.task_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def SearchLeadTasks(
        self, request: leads_service_pb2.SearchLeadTasksRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.SearchLeadTasksResponse:
        filters = TaskFilters(
            owner_id=request.owner_id, status=request.status or "open", kind=request.kind, due=request.due
        )
        rows, cursor = await self.service.list_scoped_tasks(
            filters, tasks_scope=_scope_on("tasks", context), limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.SearchLeadTasksResponse(
            items=[messages.task_to_proto(r) for r in rows],
            page_info=common_pb2.PageInfo(next_cursor=cursor),
            lead_names={r["lead_id"]: r["lead_name"] for r in rows},
        )

    async def GetLeadScoreHistory(
        self, request: leads_service_pb2.GetLeadScoreHistoryRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetLeadScoreHistoryResponse:
        rows, cursor = await self.service.score_history(
            request.lead_id, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.GetLeadScoreHistoryResponse(
            items=[messages.score_change_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    # --- assignment, disqualification, conversion, pool ---

    async def AssignLead(
        self, request: leads_service_pb2.AssignLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.AssignLeadResponse:
        change = await self.service.assign(
            request.lead_id, request.owner_id, request.team, request.expected_version, request.idempotency_key
        )
        return leads_service_pb2.AssignLeadResponse(
            lead=messages.lead_to_proto(change.record),
            previous=previous_message(messages.lead_to_proto, change.previous),
        )

    async def TransferLeads(
        self, request: leads_service_pb2.TransferLeadsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.TransferLeadsResponse:
        transfer, lead_ids, skipped_lead_ids = await self.service.transfer_leads(
            request.from_owner_id, request.to_owner_id, request.to_team, request.reason, request.idempotency_key
        )
        return leads_service_pb2.TransferLeadsResponse(
            bulk_transfer_id=transfer["id"],
            leads_transferred=transfer["leads"],
            tasks_transferred=transfer["tasks"],
            lead_ids=lead_ids,
            skipped_lead_ids=skipped_lead_ids,
        )

    async def RecordLeadEngagements(
        self, request: leads_service_pb2.RecordLeadEngagementsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.RecordLeadEngagementsResponse:
        outcomes = await self.service.record_engagements(
            [
                EngagementInput(
                    kind=item.kind,
                    external_id=item.external_id,
                    occurred_at=from_timestamp(item.occurred_at),
                    url=item.url,
                    lead_id=item.lead_id,
                    email=item.email,
                )
                for item in request.items
            ]
        )
        statuses = [o.status for o in outcomes]
        return leads_service_pb2.RecordLeadEngagementsResponse(
            results=[
                leads_service_pb2.EngagementResult(
                    index=o.index, status=o.status, lead_id=o.lead_id, reason=o.reason, field=o.field
                )
                for o in outcomes
            ],
            recorded=statuses.count("recorded"),
            duplicates=statuses.count("duplicate"),
            rejected=statuses.count("rejected"),
        )

    async def ListLeadEngagements(
        self, request: leads_service_pb2.ListLeadEngagementsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadEngagementsResponse:
        rows, cursor = await self.service.list_engagements(
            request.lead_id, request.kind, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListLeadEngagementsResponse(
            items=[messages.engagement_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def DisqualifyLead(
        self, request: leads_service_pb2.DisqualifyLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DisqualifyLeadResponse:
        change = await self.service.disqualify(
            request.lead_id, request.reason, request.expected_version, request.idempotency_key
        )
        return leads_service_pb2.DisqualifyLeadResponse(
            lead=messages.lead_to_proto(change.record),
            previous=previous_message(messages.lead_to_proto, change.previous),
        )

    async def DeleteLead(
        self, request: leads_service_pb2.DeleteLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DeleteLeadResponse:
        deleted = await self.service.delete_lead(request.lead_id, request.expected_version)
        return leads_service_pb2.DeleteLeadResponse(previous=messages.lead_to_proto(deleted))

    async def ConvertLead(
        self, request: leads_service_pb2.ConvertLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ConvertLeadResponse:
        close = from_timestamp(request.expected_close_date)
        result = await self.service.convert(
            ConvertRequest(
                lead_id=request.lead_id,
                account_id=request.account_id,
                account_name=request.account_name,
                create_opportunity=request.create_opportunity,
                opportunity_name=request.opportunity_name,
                opportunity_amount=_money(
                    request.opportunity_amount, "opportunity_amount", request.HasField("opportunity_amount")
                ),
                pipeline_id=request.pipeline_id,
                expected_close_date=close.date() if close else None,
                idempotency_key=request.idempotency_key,
                scopes=_conversion_scopes(context),
            )
        )
        return leads_service_pb2.ConvertLeadResponse(
            lead=messages.lead_to_proto(result.lead),
            account_id=result.account_id,
            contact_id=result.contact_id,
            opportunity_id=result.opportunity_id,
            previous=previous_message(messages.lead_to_proto, result.previous),
            account_created=result.account_created,
            contact_created=result.contact_created,
        )

    async def ListLeadPool(
        self, request: leads_service_pb2.ListLeadPoolRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListLeadPoolResponse:
        rows, cursor = await self.service.list_pool(
            region=request.region,
            industry=request.industry,
            source=request.source,
            limit=request.page.limit,
            cursor=request.page.cursor,
            sort=request.page.sort,
        )
        return leads_service_pb2.ListLeadPoolResponse(
            items=[messages.lead_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def ClaimLead(
        self, request: leads_service_pb2.ClaimLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ClaimLeadResponse:
        return leads_service_pb2.ClaimLeadResponse(
            lead=messages.lead_to_proto(await self.service.claim(request.lead_id, request.idempotency_key))
        )

    async def ReleaseLead(
        self, request: leads_service_pb2.ReleaseLeadRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ReleaseLeadResponse:
        change = await self.service.release(
            request.lead_id, request.reason, request.idempotency_key, own_only=request.own_only
        )
        return leads_service_pb2.ReleaseLeadResponse(
            lead=messages.lead_to_proto(change.record),
            previous=previous_message(messages.lead_to_proto, change.previous),
        )

    # --- rules ---

    @staticmethod
    def _scoring_rule(message: leads_pb2.ScoringRule) -> ScoringRule:
        return ScoringRule(
            id=message.id,
            points=message.points,
            field=message.field,
            operator=message.operator,
            value=message.value,
            activity_kind=message.activity_kind,
            min_count=message.min_count,
            enabled=message.enabled,
            engagement_kind=message.engagement_kind,
            url_contains=message.url_contains,
        )

    async def CreateScoringRule(
        self, request: leads_service_pb2.CreateScoringRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.CreateScoringRuleResponse:
        row = await self.service.create_scoring_rule(
            self._scoring_rule(request.rule), request.rule.name, request.idempotency_key
        )
        return leads_service_pb2.CreateScoringRuleResponse(rule=messages.scoring_rule_to_proto(row))

    async def UpdateScoringRule(
        self, request: leads_service_pb2.UpdateScoringRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateScoringRuleResponse:
        change = await self.service.update_scoring_rule(
            self._scoring_rule(request.rule), request.rule.name, request.expected_version
        )
        return leads_service_pb2.UpdateScoringRuleResponse(
            rule=messages.scoring_rule_to_proto(change.record),
            previous=previous_message(messages.scoring_rule_to_proto, change.previous),
        )

    async def DeleteScoringRule(
        self, request: leads_service_pb2.DeleteScoringRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DeleteScoringRuleResponse:
        deleted = await self.service.delete_scoring_rule(request.rule_id, request.expected_version)
        return leads_service_pb2.DeleteScoringRuleResponse(previous=messages.scoring_rule_to_proto(deleted))

    async def ListScoringRules(
        self, request: leads_service_pb2.ListScoringRulesRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListScoringRulesResponse:
        rows, cursor, t, version = await self.service.list_scoring_rules(
            limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListScoringRulesResponse(
            items=[messages.scoring_rule_to_proto(r) for r in rows],
            thresholds=_thresholds_message(t),
            thresholds_version=version,
            page_info=common_pb2.PageInfo(next_cursor=cursor),
        )

    async def GetScoringRule(
        self, request: leads_service_pb2.GetScoringRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetScoringRuleResponse:
        row = await self.service.get_scoring_rule(request.rule_id)
        return leads_service_pb2.GetScoringRuleResponse(rule=messages.scoring_rule_to_proto(row))

    async def SetGradeThresholds(
        self, request: leads_service_pb2.SetGradeThresholdsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.SetGradeThresholdsResponse:
        t = request.thresholds
        change = await self.service.set_thresholds(Thresholds(a=t.a, b=t.b, c=t.c), request.expected_version)
        saved, previous = change.record, change.previous
        return leads_service_pb2.SetGradeThresholdsResponse(
            thresholds=_thresholds_message(saved.thresholds),
            version=saved.version,
            previous=previous_message(lambda p: _thresholds_message(p.thresholds), previous),
            previous_version=previous.version if previous else 0,
        )

    @staticmethod
    def _assignment_rule(message: leads_pb2.AssignmentRule) -> AssignmentRule:
        return AssignmentRule(
            id=message.id,
            position=message.position,
            user_ids=tuple(u.strip() for u in message.user_ids),  # a blank one is refused, not dropped
            strategy=message.strategy or "round_robin",
            team=message.team,
            regions=frozenset(message.regions),
            industries=frozenset(message.industries),
            sources=frozenset(message.sources),
            min_score=message.min_score,
            max_score=message.max_score,
            capacity=message.capacity,
            enabled=message.enabled,
            lead_team=message.lead_team,
        )

    async def CreateAssignmentRule(
        self, request: leads_service_pb2.CreateAssignmentRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.CreateAssignmentRuleResponse:
        row = await self.service.create_assignment_rule(
            self._assignment_rule(request.rule), request.rule.name, request.idempotency_key
        )
        return leads_service_pb2.CreateAssignmentRuleResponse(rule=messages.assignment_rule_to_proto(row))

    async def UpdateAssignmentRule(
        self, request: leads_service_pb2.UpdateAssignmentRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateAssignmentRuleResponse:
        change = await self.service.update_assignment_rule(
            self._assignment_rule(request.rule), request.rule.name, request.expected_version
        )
        return leads_service_pb2.UpdateAssignmentRuleResponse(
            rule=messages.assignment_rule_to_proto(change.record),
            previous=previous_message(messages.assignment_rule_to_proto, change.previous),
        )

    async def DeleteAssignmentRule(
        self, request: leads_service_pb2.DeleteAssignmentRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DeleteAssignmentRuleResponse:
        deleted = await self.service.delete_assignment_rule(request.rule_id, request.expected_version)
        return leads_service_pb2.DeleteAssignmentRuleResponse(previous=messages.assignment_rule_to_proto(deleted))

    async def GetAssignmentRule(
        self, request: leads_service_pb2.GetAssignmentRuleRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetAssignmentRuleResponse:
        row = await self.service.get_assignment_rule(request.rule_id)
        return leads_service_pb2.GetAssignmentRuleResponse(rule=messages.assignment_rule_to_proto(row))

    async def ListAssignmentRules(
        self, request: leads_service_pb2.ListAssignmentRulesRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListAssignmentRulesResponse:
        rows, cursor = await self.service.list_assignment_rules(limit=request.page.limit, cursor=request.page.cursor)
        return leads_service_pb2.ListAssignmentRulesResponse(
            items=[messages.assignment_rule_to_proto(r) for r in rows],
            page_info=common_pb2.PageInfo(next_cursor=cursor),
        )

    # --- campaigns ---

    @staticmethod
    def _campaign(message: leads_service_pb2.CampaignInput) -> dict[str, Any]:
        return {
            "name": message.name,
            "channel": message.channel,
            "cost": _money(message.cost, "cost", message.HasField("cost")),
            "starts_on": message.starts_on,
            "ends_on": message.ends_on,
            "owner_id": message.owner_id,
            "team": message.team,
        }

    async def CreateCampaign(
        self, request: leads_service_pb2.CreateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.CreateCampaignResponse:
        row = await self.service.create_campaign(self._campaign(request.campaign), request.idempotency_key)
        return leads_service_pb2.CreateCampaignResponse(campaign=messages.campaign_to_proto(row))

    async def GetCampaign(
        self, request: leads_service_pb2.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetCampaignResponse:
        row = await self.service.get_campaign(request.campaign_id)
        return leads_service_pb2.GetCampaignResponse(campaign=messages.campaign_to_proto(row))

    async def UpdateCampaign(
        self, request: leads_service_pb2.UpdateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateCampaignResponse:
        paths = list(request.update_mask.paths)
        change = await self.service.update_campaign(
            request.campaign_id, self._campaign(request.campaign), paths, request.expected_version
        )
        return leads_service_pb2.UpdateCampaignResponse(
            campaign=messages.campaign_to_proto(change.record),
            previous=previous_message(messages.campaign_to_proto, change.previous),
        )

    async def DeleteCampaign(
        self, request: leads_service_pb2.DeleteCampaignRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.DeleteCampaignResponse:
        deleted = await self.service.delete_campaign(request.campaign_id, request.expected_version)
        return leads_service_pb2.DeleteCampaignResponse(previous=messages.campaign_to_proto(deleted))

    async def ListCampaigns(
        self, request: leads_service_pb2.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListCampaignsResponse:
        rows, cursor = await self.service.list_campaigns(
            request.channel, limit=request.page.limit, cursor=request.page.cursor
        )
        return leads_service_pb2.ListCampaignsResponse(
            items=[messages.campaign_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    # --- webforms ---

    async def CreateWebform(
        self, request: leads_service_pb2.CreateWebformRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.CreateWebformResponse:
        row = await self.service.create_webform(_webform_settings(request.webform), request.idempotency_key)
        return leads_service_pb2.CreateWebformResponse(webform=messages.webform_to_proto(row))

    async def ListWebforms(
        self, request: leads_service_pb2.ListWebformsRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.ListWebformsResponse:
        rows, cursor = await self.service.list_webforms(limit=request.page.limit, cursor=request.page.cursor)
        return leads_service_pb2.ListWebformsResponse(
            items=[messages.webform_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def GetWebform(
        self, request: leads_service_pb2.GetWebformRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.GetWebformResponse:
        row = await self.service.get_webform(request.id)
        return leads_service_pb2.GetWebformResponse(webform=messages.webform_to_proto(row))

    async def SetWebformEnabled(
        self, request: leads_service_pb2.SetWebformEnabledRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.SetWebformEnabledResponse:
        # Unconditional: the request carries no version (UpdateWebform does).
        change = await self.service.update_webform(request.id, {"enabled": request.enabled}, ["enabled"], 0)
        return leads_service_pb2.SetWebformEnabledResponse(webform=messages.webform_to_proto(change.record))

    async def UpdateWebform(
        self, request: leads_service_pb2.UpdateWebformRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.UpdateWebformResponse:
        data = {**_webform_settings(request.webform), "enabled": request.webform.enabled}
        change = await self.service.update_webform(
            request.id, data, list(request.update_mask.paths), request.expected_version
        )
        return leads_service_pb2.UpdateWebformResponse(
            webform=messages.webform_to_proto(change.record),
            previous=previous_message(messages.webform_to_proto, change.previous),
        )

    async def RotateWebformKey(
        self, request: leads_service_pb2.RotateWebformKeyRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.RotateWebformKeyResponse:
        row = await self.service.rotate_webform_key(request.id, request.idempotency_key, request.expected_version)
        return leads_service_pb2.RotateWebformKeyResponse(webform=messages.webform_to_proto(row))

    async def SubmitWebform(
        self, request: leads_service_pb2.SubmitWebformRequest, context: grpc.aio.ServicerContext
    ) -> leads_service_pb2.SubmitWebformResponse:
        try:
            submission = await self.service.capture_submission(
                request.form_key, dict(request.fields), request.idempotency_key
            )
        except RateLimited as error:
            # crm_platform maps no rate-limit error yet: RESOURCE_EXHAUSTED with the wait in trailers.
            context.set_trailing_metadata((("retry-after", str(error.retry_after)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, error.detail)
        if submission is None:
            return leads_service_pb2.SubmitWebformResponse(discarded_as_spam=True)
        capture = submission.capture
        return leads_service_pb2.SubmitWebformResponse(
            lead_id=capture.lead["id"],
            merged=capture.merged,
            webform_id=submission.webform_id,
            lead=messages.lead_to_proto(capture.lead),
            previous=previous_message(messages.lead_to_proto, capture.previous),
        )


def _thresholds_message(t: Thresholds) -> leads_pb2.GradeThresholds:
    return leads_pb2.GradeThresholds(a=t.a, b=t.b, c=t.c)
