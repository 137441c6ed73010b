"""gRPC <-> handler translation for crm.accounts.v1.AccountsService (no business rules here)."""

from typing import Any

from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer
from crm.common.v1 import common_pb2
from crm_platform.changes import previous_message
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.principal import RecordScope, ScopeKind, current_principal, resource_scope_from_metadata
from crm_platform.structs import struct_values
from crm_platform.timeutil import from_timestamp
from crm_platform.update_mask import writable_paths

from accounts import handlers
from accounts.handlers import ACCOUNT_FIELDS, ACTIVITY_FIELDS, CONTACT_FIELDS, SEGMENT_FIELDS, TASK_FIELDS, Context
from accounts.messages import (
    account_to_proto,
    activity_to_proto,
    contact_to_proto,
    money_value,
    rule_to_proto,
    segment_to_proto,
    task_to_proto,
)
from accounts.repository import AccountFilter, ContactFilter, Page, parse_page

Ctx = Any  # grpc.aio.ServicerContext; grpc is untyped here


def _page(page: common_pb2.PageRequest) -> Page:
    return parse_page(page.limit, page.cursor, page.sort)


def _mask(mask: Any, allowed: tuple[str, ...]) -> list[str]:
    """Update-mask paths; `custom.<key>` selects one custom field."""
    return writable_paths(mask.paths, allowed, keyed=True)


def _select(values: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    selected: dict[str, Any] = {}
    for path in paths:
        head, _, key = path.partition(".")
        if head == "custom" and key:
            selected.setdefault("custom", {})[key] = values.get("custom", {}).get(key)
        elif head in values:
            selected[head] = values[head]
    return selected


def account_values(message: pb.AccountInput) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: getattr(message, name)
        for name in ("name", "industry", "size", "region", "address", "website", "tier", "lifecycle", "owner_id",
                     "team", "parent_id")
    }  # fmt: skip
    values["tags"] = list(message.tags)
    values["custom"] = struct_values(message.custom)
    for name in ("annual_revenue", "credit_limit"):
        amount, currency = money_value(getattr(message, name), field=name)
        values[name] = amount
        values[f"{name}_currency"] = currency
    return values


def _with_currency(selected: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for name in ("annual_revenue", "credit_limit"):
        if name in selected:
            selected[f"{name}_currency"] = values[f"{name}_currency"]
    return selected


def contact_values(message: pb.ContactInput) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: getattr(message, name)
        for name in ("account_id", "name", "title", "department", "phone", "mobile", "email", "wechat",
                     "decision_role", "is_primary")
    }  # fmt: skip
    values["tags"] = list(message.tags)
    values["custom"] = struct_values(message.custom)
    return values


def task_values(message: pb.TaskInput) -> dict[str, Any]:
    return {
        "account_id": message.account_id,
        "contact_id": message.contact_id,
        "title": message.title,
        "notes": message.notes,
        "due_at": from_timestamp(message.due_at) if message.HasField("due_at") else None,
        "owner_id": message.owner_id,
    }


def activity_values(message: accounts_pb2.Activity) -> dict[str, Any]:
    return {
        "kind": message.kind,
        "subject": message.subject,
        "notes": message.notes,
        "occurred_at": from_timestamp(message.occurred_at) if message.HasField("occurred_at") else None,
        "outcome": message.outcome,
        "next_follow_up_at": (
            from_timestamp(message.next_follow_up_at) if message.HasField("next_follow_up_at") else None
        ),
    }


def _accounts_scope(context: Ctx) -> RecordScope:
    """The caller's scope for reading accounts, sent along with a call whose own scope is another
    resource's (an activity's); not sent, the caller's own accounts, as for the call's own scope."""
    sent = resource_scope_from_metadata(context.invocation_metadata(), "accounts")
    return sent or RecordScope(ScopeKind.OWN, owner_id=current_principal().user_id)


def _in_pool(text: str) -> bool | None:
    if text not in ("", "true", "false"):
        raise ValidationFailed([FieldError("in_pool", "must be true or false")])
    return None if text == "" else text == "true"


class AccountsServicer(AccountsServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # accounts

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Ctx) -> pb.CreateAccountResponse:
        row = await handlers.create_account(
            self.ctx, account_values(request.account), idempotency_key=request.idempotency_key, in_pool=request.in_pool
        )
        return pb.CreateAccountResponse(account=account_to_proto(row))

    async def GetAccount(self, request: pb.GetAccountRequest, context: Ctx) -> pb.GetAccountResponse:
        return pb.GetAccountResponse(account=account_to_proto(await handlers.get_account(self.ctx, request.account_id)))

    async def UpdateAccount(self, request: pb.UpdateAccountRequest, context: Ctx) -> pb.UpdateAccountResponse:
        values = account_values(request.account)
        selected = _with_currency(_select(values, _mask(request.update_mask, ACCOUNT_FIELDS)), values)
        change = await handlers.update_account(
            self.ctx, request.account_id, selected, expected_version=request.expected_version
        )
        return pb.UpdateAccountResponse(
            account=account_to_proto(change.record), previous=previous_message(account_to_proto, change.previous)
        )

    async def DeleteAccount(self, request: pb.DeleteAccountRequest, context: Ctx) -> pb.DeleteAccountResponse:
        deleted = await handlers.delete_account(self.ctx, request.account_id, expected_version=request.expected_version)
        return pb.DeleteAccountResponse(previous=account_to_proto(deleted))

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Ctx) -> pb.ListAccountsResponse:
        page = _page(request.page)
        f = AccountFilter(
            q=request.q,
            tiers=list(request.tiers),
            lifecycles=list(request.lifecycles),
            regions=list(request.regions),
            industries=list(request.industries),
            owner_id=request.owner_id,
            team=request.team,
            tags=list(request.tags),
            parent_id=request.parent_id,
            in_pool=_in_pool(request.in_pool),
            created_after=from_timestamp(request.created_after) if request.HasField("created_after") else None,
            include_merged=request.include_merged,
            ids=list(request.ids),
        )
        custom = [(c.key, c.value) for c in request.custom]
        rows, cursor = await handlers.list_accounts(self.ctx, f, custom, page, request.segment_id)
        return pb.ListAccountsResponse(
            items=[account_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def MergeAccounts(self, request: pb.MergeAccountsRequest, context: Ctx) -> pb.MergeAccountsResponse:
        merge = await handlers.merge_accounts(
            self.ctx, request.survivor_id, request.duplicate_id, idempotency_key=request.idempotency_key
        )
        return pb.MergeAccountsResponse(
            survivor=account_to_proto(merge.survivor),
            moved_contact_ids=merge.moved_contact_ids,
            moved_activities=merge.moved_activities,
            moved_tasks=merge.moved_tasks,
            previous_survivor=previous_message(account_to_proto, merge.previous_survivor),
            previous_duplicate=previous_message(account_to_proto, merge.previous_duplicate),
        )

    # pool and ownership

    async def ListPoolAccounts(self, request: pb.ListPoolAccountsRequest, context: Ctx) -> pb.ListPoolAccountsResponse:
        page = _page(request.page)
        f = AccountFilter(
            q=request.q,
            tiers=list(request.tiers),
            regions=list(request.regions),
            industries=list(request.industries),
            tags=list(request.tags),
        )
        rows, cursor = await handlers.list_pool(self.ctx, f, page)
        return pb.ListPoolAccountsResponse(
            items=[account_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def ReleaseAccount(self, request: pb.ReleaseAccountRequest, context: Ctx) -> pb.ReleaseAccountResponse:
        change = await handlers.release_account(
            self.ctx, request.account_id, reason=request.reason, expected_version=request.expected_version
        )
        return pb.ReleaseAccountResponse(
            account=account_to_proto(change.record), previous=previous_message(account_to_proto, change.previous)
        )

    async def ClaimAccount(self, request: pb.ClaimAccountRequest, context: Ctx) -> pb.ClaimAccountResponse:
        change = await handlers.claim_account(self.ctx, request.account_id, idempotency_key=request.idempotency_key)
        return pb.ClaimAccountResponse(
            account=account_to_proto(change.record), previous=previous_message(account_to_proto, change.previous)
        )

    async def TransferAccount(self, request: pb.TransferAccountRequest, context: Ctx) -> pb.TransferAccountResponse:
        change = await handlers.transfer_account(
            self.ctx,
            request.account_id,
            new_owner_id=request.new_owner_id,
            new_team=request.new_team,
            reason=request.reason,
            expected_version=request.expected_version,
        )
        return pb.TransferAccountResponse(
            account=account_to_proto(change.record), previous=previous_message(account_to_proto, change.previous)
        )

    async def BulkTransferAccounts(
        self, request: pb.BulkTransferAccountsRequest, context: Ctx
    ) -> pb.BulkTransferAccountsResponse:
        row, account_ids = await handlers.bulk_transfer(
            self.ctx,
            from_owner_id=request.from_owner_id,
            to_owner_id=request.to_owner_id,
            to_team=request.to_team,
            reason=request.reason,
            idempotency_key=request.idempotency_key,
        )
        return pb.BulkTransferAccountsResponse(
            bulk_transfer_id=row.id,
            accounts_transferred=row.accounts,
            contacts_transferred=row.contacts,
            tasks_transferred=row.tasks,
            account_ids=account_ids,
        )

    # contacts

    async def CreateContact(self, request: pb.CreateContactRequest, context: Ctx) -> pb.CreateContactResponse:
        row = await handlers.create_contact(
            self.ctx, contact_values(request.contact), idempotency_key=request.idempotency_key
        )
        return pb.CreateContactResponse(contact=contact_to_proto(row))

    async def GetContact(self, request: pb.GetContactRequest, context: Ctx) -> pb.GetContactResponse:
        return pb.GetContactResponse(contact=contact_to_proto(await handlers.get_contact(self.ctx, request.contact_id)))

    async def UpdateContact(self, request: pb.UpdateContactRequest, context: Ctx) -> pb.UpdateContactResponse:
        values = _select(contact_values(request.contact), _mask(request.update_mask, CONTACT_FIELDS))
        change = await handlers.update_contact(
            self.ctx, request.contact_id, values, expected_version=request.expected_version
        )
        return pb.UpdateContactResponse(
            contact=contact_to_proto(change.record), previous=previous_message(contact_to_proto, change.previous)
        )

    async def DeleteContact(self, request: pb.DeleteContactRequest, context: Ctx) -> pb.DeleteContactResponse:
        deleted = await handlers.delete_contact(self.ctx, request.contact_id, expected_version=request.expected_version)
        return pb.DeleteContactResponse(previous=contact_to_proto(deleted))

    async def ListContacts(self, request: pb.ListContactsRequest, context: Ctx) -> pb.ListContactsResponse:
        page = _page(request.page)
        f = ContactFilter(
            account_id=request.account_id,
            q=request.q,
            tags=list(request.tags),
            decision_roles=list(request.decision_roles),
            owner_id=request.owner_id,
        )
        custom = [(c.key, c.value) for c in request.custom]
        # Sent along (GET /accounts/{id}/contacts), the list is of an account the caller may read.
        account_scope = resource_scope_from_metadata(context.invocation_metadata(), "accounts")
        rows, cursor = await handlers.list_contacts(self.ctx, f, custom, page, account_scope=account_scope)
        return pb.ListContactsResponse(
            items=[contact_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def FindContacts(self, request: pb.FindContactsRequest, context: Ctx) -> pb.FindContactsResponse:
        rows = await handlers.find_contacts(
            self.ctx, email=request.email, phone=request.phone, limit=request.limit or 10
        )
        return pb.FindContactsResponse(items=[contact_to_proto(r) for r in rows])

    # activities and tasks

    async def LogActivity(self, request: pb.LogActivityRequest, context: Ctx) -> pb.LogActivityResponse:
        row = await handlers.log_activity(
            self.ctx,
            account_id=request.account_id,
            contact_id=request.contact_id,
            kind=request.kind,
            subject=request.subject,
            notes=request.notes,
            occurred_at=from_timestamp(request.occurred_at) if request.HasField("occurred_at") else None,
            idempotency_key=request.idempotency_key,
            outcome=request.outcome,
            next_follow_up_at=(
                from_timestamp(request.next_follow_up_at) if request.HasField("next_follow_up_at") else None
            ),
        )
        return pb.LogActivityResponse(activity=activity_to_proto(row))

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Ctx) -> pb.ListActivitiesResponse:
        sort = request.page.sort or "-occurred_at"
        page = parse_page(request.page.limit, request.page.cursor, sort, sorts={"occurred_at"})
        rows, cursor = await handlers.list_activities(
            self.ctx,
            account_id=request.account_id,
            contact_id=request.contact_id,
            page=page,
            account_scope=resource_scope_from_metadata(context.invocation_metadata(), "accounts"),
        )
        return pb.ListActivitiesResponse(
            items=[activity_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def UpdateActivity(self, request: pb.UpdateActivityRequest, context: Ctx) -> pb.UpdateActivityResponse:
        previous, row = await handlers.update_activity(
            self.ctx,
            request.account_id,
            request.activity_id,
            _select(activity_values(request.activity), _mask(request.update_mask, ACTIVITY_FIELDS)),
            expected_version=request.expected_version,
            account_scope=_accounts_scope(context),
        )
        return pb.UpdateActivityResponse(activity=activity_to_proto(row), previous=activity_to_proto(previous))

    async def DeleteActivity(self, request: pb.DeleteActivityRequest, context: Ctx) -> pb.DeleteActivityResponse:
        row = await handlers.delete_activity(
            self.ctx,
            request.account_id,
            request.activity_id,
            expected_version=request.expected_version,
            account_scope=_accounts_scope(context),
        )
        return pb.DeleteActivityResponse(activity=activity_to_proto(row))

    async def CreateTask(self, request: pb.CreateTaskRequest, context: Ctx) -> pb.CreateTaskResponse:
        row = await handlers.create_task(self.ctx, task_values(request.task), idempotency_key=request.idempotency_key)
        return pb.CreateTaskResponse(task=task_to_proto(row))

    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: Ctx) -> pb.UpdateTaskResponse:
        values = _select(task_values(request.task), _mask(request.update_mask, TASK_FIELDS))
        change = await handlers.update_task(
            self.ctx, request.task_id, values, expected_version=request.expected_version
        )
        return pb.UpdateTaskResponse(task=task_to_proto(change.record), previous=task_to_proto(change.previous))

    async def CompleteTask(self, request: pb.CompleteTaskRequest, context: Ctx) -> pb.CompleteTaskResponse:
        change = await handlers.complete_task(self.ctx, request.task_id, expected_version=request.expected_version)
        return pb.CompleteTaskResponse(task=task_to_proto(change.record), previous=task_to_proto(change.previous))

    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        sort = request.page.sort or ("due_at" if request.due else "")
        page = parse_page(request.page.limit, request.page.cursor, sort, sorts={"created_at", "due_at"})
        rows, cursor = await handlers.list_tasks(
            self.ctx,
            due=request.due,
            account_id=request.account_id,
            owner_id=request.owner_id,
            statuses=list(request.statuses),
            page=page,
        )
        return pb.ListTasksResponse(
            items=[task_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    # reminder rules

    async def CreateReminderRule(
        self, request: pb.CreateReminderRuleRequest, context: Ctx
    ) -> pb.CreateReminderRuleResponse:
        rule = request.rule
        row = await handlers.create_reminder_rule(
            self.ctx,
            name=rule.name,
            tiers=list(rule.tiers),
            inactive_days=rule.inactive_days,
            task_title=rule.task_title,
            due_in_hours=rule.due_in_hours,
            enabled=rule.enabled,
            idempotency_key=request.idempotency_key,
        )
        return pb.CreateReminderRuleResponse(rule=rule_to_proto(row))

    async def ListReminderRules(
        self, request: pb.ListReminderRulesRequest, context: Ctx
    ) -> pb.ListReminderRulesResponse:
        page = parse_page(request.page.limit, request.page.cursor, request.page.sort, sorts={"created_at"})
        rows, cursor = await handlers.list_reminder_rules(self.ctx, page)
        return pb.ListReminderRulesResponse(
            items=[rule_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def DeleteReminderRule(
        self, request: pb.DeleteReminderRuleRequest, context: Ctx
    ) -> pb.DeleteReminderRuleResponse:
        await handlers.delete_reminder_rule(self.ctx, request.rule_id)
        return pb.DeleteReminderRuleResponse()

    # segments

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Ctx) -> pb.CreateSegmentResponse:
        row = await handlers.create_segment(
            self.ctx,
            name=request.name,
            visibility=request.visibility,
            filters=dict(request.filters),
            tags=list(request.tags),
            idempotency_key=request.idempotency_key,
        )
        return pb.CreateSegmentResponse(segment=segment_to_proto(row))

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Ctx) -> pb.GetSegmentResponse:
        return pb.GetSegmentResponse(segment=segment_to_proto(await handlers.get_segment(self.ctx, request.segment_id)))

    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Ctx) -> pb.ListSegmentsResponse:
        sort = request.page.sort or "name"
        page = parse_page(request.page.limit, request.page.cursor, sort, sorts={"name", "created_at"})
        rows, cursor = await handlers.list_segments(self.ctx, page)
        return pb.ListSegmentsResponse(
            items=[segment_to_proto(r) for r in rows], page_info=common_pb2.PageInfo(next_cursor=cursor)
        )

    async def UpdateSegment(self, request: pb.UpdateSegmentRequest, context: Ctx) -> pb.UpdateSegmentResponse:
        segment = request.segment
        values = {
            "name": segment.name,
            "visibility": segment.visibility,
            "filters": dict(segment.filters),
            "tags": list(segment.tags),
        }
        change = await handlers.update_segment(
            self.ctx,
            request.segment_id,
            _select(values, _mask(request.update_mask, SEGMENT_FIELDS)),
            expected_version=request.expected_version,
        )
        return pb.UpdateSegmentResponse(
            segment=segment_to_proto(change.record), previous=previous_message(segment_to_proto, change.previous)
        )

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Ctx) -> pb.DeleteSegmentResponse:
        deleted = await handlers.delete_segment(self.ctx, request.segment_id, expected_version=request.expected_version)
        return pb.DeleteSegmentResponse(previous=segment_to_proto(deleted))
