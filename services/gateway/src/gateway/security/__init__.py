"""The gateway's security mechanism: one policy, one decision, used by every route.

A route declares its resource and action; everything else follows from the policy file:

    from typing import Annotated
    from fastapi import Depends
    from gateway.security import Access, require

    @router.get("/leads/{lead_id}")
    async def get_lead(lead_id: str, access: Annotated[Access, Depends(require("leads", "read"))]) -> dict:
        reply = await stub.GetLead(request, metadata=access.grpc_metadata(), timeout=...)
        return access.present(lead_to_dict(reply.lead))

    access.principal                  the authenticated caller (crm_platform.principal.Principal)
    access.scope                      the RecordScope for this resource and action
    access.grpc_metadata()            principal + record scope + request id for the service call
                                      (the service filters by the scope: out of scope -> NOT_FOUND -> 404)
    access.check_write(body_dict)     403 naming the first field (nested: custom.x, line_items.discount_percent)
                                      the caller may not write; call BEFORE the service call
    access.check_filter(names)        403 when filtering/sorting by a hidden or masked field ("-x" sorts by x)
    access.present(record)            hidden fields dropped, masked fields masked, sensitive reads audited
    access.present_many(records)
    access.masks_personal_data()      does the caller see personal data (pii fields) masked? Records with
                                      custom fields are presented by gateway.routers.custom_fields.presenter(access),
                                      which masks the custom values defined as pii for such callers, and list
                                      routes check `?custom.<key>=` filters with custom_filters(access);
                                      saved filters (segments) pass the same checks when saved and when used
    access.page_limit(limit)          the page size capped at CRM_GATEWAY_MAX_PAGE_SIZE
    access.ensure("assign")           403 unless the caller may also do another action on this resource
    access.view("contacts")           Access to another resource for a composed view, or None
    access.allows_record(record)      in-scope test for records the gateway already holds
    await access.audit_write(record_id, before, after)   audit row: changed fields, PII masked
                                      (before=None: create; after=None: delete)
    await access.audit("export", record_id, fields=[...], reason="...")

Actions: read, create, update, delete, export, assign, approve. State transitions (stage, win,
submit, sign, ...) are `update`; assign/claim/release/transfer are `assign`; approve/reject are
`approve`; bulk import is `create`.

Routes that only need the caller: `principal: CurrentPrincipal` (gateway.security.CurrentPrincipal).
Exports: register a source with `gateway.security.exports.register_export_source(resource, fn)`.
"""

from gateway.security.access import Access, CurrentPrincipal, FilterFields, authenticate, require
from gateway.security.policy import ACTIONS, Policy, PolicyError, load_policy
from gateway.security.problems import SecurityProblem
from gateway.security.runtime import SecurityRuntime, declared_routes, install_security
from gateway.security.settings import SecuritySettings

__all__ = [
    "ACTIONS",
    "Access",
    "CurrentPrincipal",
    "FilterFields",
    "Policy",
    "PolicyError",
    "SecurityProblem",
    "SecurityRuntime",
    "SecuritySettings",
    "authenticate",
    "declared_routes",
    "install_security",
    "load_policy",
    "require",
]
