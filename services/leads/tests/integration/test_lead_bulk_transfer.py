"""A departing rep's leads go to another rep (SPEC §5, 人走客户不走; `TransferLeads`,
`POST /leads:transfer`): the leads they are working in the caller's scope, with their open tasks, in
one transaction, each assigned as a manual assignment is and published as `lead.assigned`; the
transfer is recorded, so a repeat of its Idempotency-Key answers the same and moves nothing more."""

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import httpx
import pytest
from crm.leads.v1 import events_pb2, leads_service_pb2, leads_service_pb2_grpc
from crm_platform.errors import NotFound, Unavailable, ValidationFailed
from crm_platform.idempotency import replayed
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.testing.outbox import outbox_events
from gateway.security.access import REPLAY_REASON
from leads import domain
from leads import repository as repo
from leads.domain import AssignmentRule
from leads.handlers import ActivityInput, ConvertRequest
from sqlalchemy import select

pytestmark = pytest.mark.integration

ASSIGNED = "crm.leads.lead.assigned"
WORKED = ("new", "contacted", "qualified")


def _manager(env: Any, user: str = "manager") -> Any:
    return env.acting(user, roles=("sales_manager",), team="east", scope=ScopeKind.TEAM)


async def _lead(env: Any, name: str, owner_id: str = "leaver", team: str = "east") -> dict[str, Any]:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": name, "owner_id": owner_id, "team": team})
    return dict(lead)


async def _leavers_book(env: Any) -> dict[str, str]:
    """The leads around `leaver` of team east, by name (ids): those they work (new with a follow-up
    planned, contacted with a follow-up, qualified), those they closed (converted, disqualified), one
    they released to the pool, one of theirs in team west, and a teammate's."""
    ids = {name: (await _lead(env, name))["id"] for name in (*WORKED, "converted", "disqualified", "released")}
    ids["west"] = (await _lead(env, "west", team="west"))["id"]
    ids["stayer's"] = (await _lead(env, "stayer's", owner_id="stayer"))["id"]
    in_three_days = env.clock() + timedelta(days=3)
    with env.acting("leaver", team="east", scope=ScopeKind.OWN):
        # A note is no contact: the new lead's first-contact task stays open beside its follow-up.
        await env.service.log_activity(ActivityInput(ids["new"], "note", next_follow_up_at=in_three_days))
        await env.service.log_activity(ActivityInput(ids["contacted"], "call", next_follow_up_at=in_three_days))
        await env.service.log_activity(ActivityInput(ids["qualified"], "call"))
        await env.service.update_lead(ids["qualified"], {"status": "qualified"}, ["status"], 0)
        await env.service.convert(ConvertRequest(ids["converted"]))
        await env.service.disqualify(ids["disqualified"], "no budget", 0)
        await env.service.release(ids["released"], "no time")
    return ids


async def _leads(env: Any) -> dict[str, dict[str, Any]]:
    async with env.engine.connect() as conn:
        return {row["id"]: dict(row) for row in (await conn.execute(select(repo.leads))).mappings()}


async def _tasks(env: Any) -> dict[str, dict[str, Any]]:
    async with env.engine.connect() as conn:
        return {row["id"]: dict(row) for row in (await conn.execute(select(repo.tasks))).mappings()}


async def _assigned_events(env: Any) -> list[events_pb2.LeadAssigned]:
    events = await outbox_events(env.engine, repo.metadata)
    return [events_pb2.LeadAssigned.FromString(payload) for kind, payload in events if kind == ASSIGNED]


async def test_a_bulk_transfer_moves_the_leads_the_rep_works_in_scope_with_their_open_tasks(
    env_each_database: Any,
) -> None:
    env = env_each_database
    ids = await _leavers_book(env)
    env.clock.advance(days=1)  # the first contact of the leads not contacted is overdue now
    await env.service.flag_overdue_first_contacts()
    before, tasks_before = await _leads(env), await _tasks(env)
    assert before[ids["new"]]["follow_up_overdue"]
    now = env.clock()

    with _manager(env):
        transfer, moved, skipped = await env.service.transfer_leads(
            "leaver", "taker", "", "left the company", "leave-1"
        )

    after, tasks_after = await _leads(env), await _tasks(env)
    # The leads the domain rule picks, of the manager's team: not the closed ones, nor the pool's,
    # nor the leaver's lead of team west, nor a teammate's.
    picked = {i for i, lead in before.items() if domain.transferable(lead, from_owner_id="leaver")}
    assert sorted(moved) == sorted(i for i in picked if before[i]["team"] == "east")
    assert sorted(moved) == sorted(ids[name] for name in WORKED)
    assert skipped == []
    for lead_id, lead in after.items():
        if lead_id not in moved:
            assert lead == before[lead_id]
            continue
        was = before[lead_id]
        assert lead["owner_id"] == "taker"
        assert (lead["team"], lead["status"], lead["in_pool"]) == ("east", was["status"], False)
        assert (lead["assigned_at"], lead["claimed_at"], lead["follow_up_overdue"]) == (now, None, False)
        assert lead["version"] == was["version"] + 1
        # A fresh first-contact SLA for the lead not contacted yet, as a manual assignment gives it.
        first_due = now + timedelta(hours=2) if lead_id == ids["new"] else None
        assert lead["first_contact_due_at"] == first_due

    open_moved = {i for i, task in tasks_before.items() if task["lead_id"] in moved and task["status"] == "open"}
    assert (transfer["id"], transfer["leads"], transfer["tasks"]) == (transfer["id"], 3, len(open_moved))
    assert len(open_moved) == 3  # the new lead's first contact and follow-up, the contacted one's follow-up
    for task_id, task in tasks_after.items():
        was = tasks_before[task_id]
        if task_id not in open_moved:
            assert task == was  # closed ones stay the leaver's: they did them
            continue
        assert (task["owner_id"], task["status"]) == ("taker", "open")
        due = now + timedelta(hours=2) if task["kind"] == "first_contact" else was["due_at"]
        assert task["due_at"] == due
    assert (transfer["from_owner_id"], transfer["to_owner_id"], transfer["reason"]) == (
        "leaver",
        "taker",
        "left the company",
    )
    assert transfer["actor_id"] == "manager"
    assert await env.loads_kept() == await env.loads_counted()


async def test_each_moved_lead_is_published_as_assigned_with_the_reason_and_the_transfer(env: Any) -> None:
    ids = await _leavers_book(env)
    assigned_before = len(await _assigned_events(env))

    with _manager(env):
        transfer, moved, _ = await env.service.transfer_leads("leaver", "taker", "west", " left the company ", "")

    events = (await _assigned_events(env))[assigned_before:]
    assert sorted(event.lead.id for event in events) == sorted(moved) == sorted(ids[name] for name in WORKED)
    after = await _leads(env)
    for event in events:
        assert (event.previous_owner_id, event.rule_id, event.reason) == ("leaver", "", "left the company")
        assert (event.bulk_transfer_id, event.actor.user_id) == (transfer["id"], "manager")
        assert (event.lead.owner_id, event.lead.team) == ("taker", "west")
        assert event.lead.version == after[event.lead.id]["version"]
    keyed = await outbox_events(env.engine, repo.metadata, key=ids["new"])
    assert [kind for kind, _ in keyed].count(ASSIGNED) == 2  # at its creation, and by the transfer


async def test_the_capacity_cap_of_the_assignment_rules_does_not_hold_a_transfer_back(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        rule = AssignmentRule(id="", position=1, user_ids=("taker",), team="east", capacity=1)
        await env.service.create_assignment_rule(rule, "taker's queue", "")
    await _lead(env, "taker's own", owner_id="taker")  # at the cap already
    for name in ("one", "two"):
        await _lead(env, name)

    with _manager(env):
        transfer, moved, _ = await env.service.transfer_leads("leaver", "taker", "", "left", "")

    assert (transfer["leads"], len(moved)) == (2, 2)
    assert (await env.loads_counted())["taker"] == 3


async def test_a_caller_transfers_only_the_leads_of_their_scope(env: Any) -> None:
    await _lead(env, "east", team="east")
    west = await _lead(env, "west", team="west")

    with env.acting("another-rep", team="west", scope=ScopeKind.OWN):  # not theirs: nothing moves
        transfer, moved, _ = await env.service.transfer_leads("leaver", "taker", "", "", "")
    assert (transfer["leads"], moved) == (0, [])
    with env.acting("west-manager", roles=("sales_manager",), team="west", scope=ScopeKind.TEAM):
        transfer, moved, _ = await env.service.transfer_leads("leaver", "taker", "", "", "")
    assert (transfer["leads"], moved) == (1, [west["id"]])


async def test_a_transfer_repeated_with_its_key_answers_the_same_and_moves_nothing_more(env: Any) -> None:
    await _lead(env, "one")
    with _manager(env):
        first, moved, _ = await env.service.transfer_leads("leaver", "taker", "", "left", "leave-1")
    late = await _lead(env, "given to the leaver since")
    assigned_before = len(await _assigned_events(env))

    with _manager(env):
        again, moved_again, skipped_again = await env.service.transfer_leads("leaver", "taker", "", "left", "leave-1")

    assert dict(again) == dict(first)
    assert (len(moved), moved_again, skipped_again) == (1, [], [])
    assert (await _leads(env))[late["id"]]["owner_id"] == "leaver"
    assert len(await _assigned_events(env)) == assigned_before
    async with env.engine.connect() as conn:
        assert len((await conn.execute(select(repo.bulk_transfers))).all()) == 1
    with _manager(env):  # under a new key: a transfer of its own, which moves it
        _, moved_later, _ = await env.service.transfer_leads("leaver", "taker", "", "left", "leave-2")
    assert moved_later == [late["id"]]


@pytest.mark.parametrize(
    ("given", "errors"),
    [
        (("", "taker", ""), [("from_owner_id", "is required")]),
        (("leaver", "", ""), [("to_owner_id", "is required")]),
        (("leaver", "leaver", ""), [("to_owner_id", "must differ from from_owner_id")]),
        (("leaver", "  ", "\t"), [("to_owner_id", "must not be blank"), ("to_team", "must not be blank")]),
    ],
)
async def test_a_transfer_without_two_different_owners_is_refused_naming_the_field(
    env: Any, given: tuple[str, str, str], errors: list[tuple[str, str]]
) -> None:
    lead = await _lead(env, "one")

    with _manager(env), pytest.raises(ValidationFailed) as caught:
        await env.service.transfer_leads(*given, "left", "leave-1")

    assert [(error.field, error.message) for error in caught.value.errors] == errors
    assert (await _leads(env))[lead["id"]]["owner_id"] == "leaver"
    async with env.engine.connect() as conn:
        assert (await conn.execute(select(repo.bulk_transfers))).all() == []


# --- over gRPC and through the gateway ---------------------------------------------------------

MANAGER = outgoing_metadata(
    Principal(user_id="manager", roles=("sales_manager",), team="east"), RecordScope(ScopeKind.TEAM, team="east")
)


async def test_over_grpc_a_refusal_is_invalid_argument_and_a_repeat_the_first_answer_marked_replayed(
    env: Any, stub: leads_service_pb2_grpc.LeadsServiceStub
) -> None:
    lead = await _lead(env, "one")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.TransferLeads(
            leads_service_pb2.TransferLeadsRequest(from_owner_id="leaver", to_owner_id="leaver"), metadata=MANAGER
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "to_owner_id" in (caught.value.details() or "")

    request = leads_service_pb2.TransferLeadsRequest(
        from_owner_id="leaver", to_owner_id="taker", reason="left", idempotency_key="leave-1"
    )
    first = stub.TransferLeads(request, metadata=MANAGER)
    answer = await first
    again = stub.TransferLeads(request, metadata=MANAGER)
    repeated = await again

    assert (answer.leads_transferred, answer.tasks_transferred, list(answer.lead_ids)) == (1, 1, [lead["id"]])
    assert repeated == answer  # the first answer, its ids included: the gateway audits it as a replay
    assert (replayed(await first.trailing_metadata()), replayed(await again.trailing_metadata())) == (False, True)


async def test_through_the_gateway_a_manager_transfers_and_each_moved_lead_is_on_the_audit_trail(
    env: Any, admin: httpx.AsyncClient, bearer: Callable[[str, str], dict[str, str]]
) -> None:
    one, two = await _lead(env, "one"), await _lead(env, "two")
    body = {"from_owner_id": "leaver", "to_owner_id": "taker", "reason": "left the company"}

    refused = await admin.post("/api/v1/leads:transfer", json=body, headers=bearer("rep-1", "sales_rep"))
    keyed = {**bearer("manager", "sales_manager"), "Idempotency-Key": "leave-1"}
    response = await admin.post("/api/v1/leads:transfer", json=body, headers=keyed)
    again = await admin.post("/api/v1/leads:transfer", json=body, headers=keyed)

    assert refused.status_code == 403, refused.text
    assert response.status_code == 200, response.text
    transfer_id = response.json()["bulk_transfer_id"]
    assert response.json() == {
        "bulk_transfer_id": transfer_id,
        "leads_transferred": 2,
        "tasks_transferred": 2,
        "skipped_lead_ids": [],
    }
    assert again.json() == response.json()
    with env.acting("admin", roles=("admin",)):
        assert {(await env.service.get_lead(lead["id"]))["owner_id"] for lead in (one, two)} == {"taker"}
    query = {"resource": "leads", "actor": "manager"}
    trail = (await admin.get("/api/v1/audit-events", params=query)).json()["items"]
    rows = sorted((row["action"], row["record_id"], row["reason"]) for row in trail)
    moved = "leaver -> taker: left the company"
    assert rows == sorted(
        [
            ("bulk_transfer", transfer_id, moved),
            ("transfer", one["id"], f"{moved} ({transfer_id})"),
            ("transfer", two["id"], f"{moved} ({transfer_id})"),
            ("replay", transfer_id, f"bulk_transfer: {REPLAY_REASON}"),
        ]
    )


async def test_a_lead_whose_conversion_is_under_way_stays_with_the_owner_its_conversion_began_with(
    env_each_database: Any,
) -> None:
    """The saga makes the account, contact and deal for the lead's owner when it began: a transfer
    meanwhile would leave them with the departing rep and the converted lead with the taker. The
    transfer's answer names the lead it left."""
    env = env_each_database
    lead = await _lead(env, "Deal in flight")
    other = await _lead(env, "Next one")
    owners_created_for: list[str] = []
    transfers: list[Any] = []
    create_opportunity = env.ports.create_opportunity

    async def transfer_meanwhile(**values: Any) -> str:
        owners_created_for.append(values["lead"]["owner_id"])
        with _manager(env):
            transfers.append(await env.service.transfer_leads("leaver", "taker", "", "left", ""))
        return str(await create_opportunity(**values))

    env.ports.create_opportunity = transfer_meanwhile
    with _manager(env, "manager2"):
        await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
    leads = await _leads(env)

    [(_, moved, skipped)] = transfers
    assert moved == [other["id"]]  # not the lead being converted
    assert skipped == [lead["id"]]
    assert owners_created_for == ["leaver"]
    assert (leads[lead["id"]]["status"], leads[lead["id"]]["owner_id"]) == ("converted", "leaver")
    assert leads[other["id"]]["owner_id"] == "taker"


async def test_a_lead_whose_conversion_an_outage_interrupted_moves_and_is_converted_for_its_new_owner(
    env: Any,
) -> None:
    """The leaver's conversion stopped when accounts went down, after it made an account for them
    (the saga left `running`); nobody runs it now. The transfer moves the lead with the others. The
    leaver can no longer convert it (not theirs: 404). A manager, who sees the account the attempt
    made, converts it for the taker: that attempt is undone, never finished into the leaver's
    account, and the lead converts into records made for the taker."""
    stuck = await _lead(env, "Stuck")
    other = await _lead(env, "Other")
    owners_created_for: list[str] = []
    create_account = env.ports.create_account

    async def noting_the_owner(**values: Any) -> str:
        owners_created_for.append(values["lead"]["owner_id"])
        return str(await create_account(**values))

    env.ports.create_account = noting_the_owner
    env.ports.fail = {"contact": Unavailable("accounts down")}
    with env.acting("leaver", team="east", scope=ScopeKind.OWN), pytest.raises(Unavailable):
        await env.service.convert(ConvertRequest(stuck["id"]))
    env.ports.fail = {}
    [leavers_account] = env.ports.accounts

    with _manager(env):
        transfer, moved, skipped = await env.service.transfer_leads("leaver", "taker", "", "left", "")

    assert (transfer["leads"], sorted(moved), skipped) == (2, sorted([stuck["id"], other["id"]]), [])
    assert (await _leads(env))[stuck["id"]]["owner_id"] == "taker"
    with env.acting("leaver", team="east", scope=ScopeKind.OWN), pytest.raises(NotFound):
        await env.service.convert(ConvertRequest(stuck["id"]))
    with _manager(env):
        converted = await env.service.convert(ConvertRequest(stuck["id"]))
    assert converted.account_id != leavers_account
    assert list(env.ports.accounts) == [converted.account_id]  # the leaver's account is undone
    assert owners_created_for == ["leaver", "taker"]
    lead = (await _leads(env))[stuck["id"]]
    assert (lead["status"], lead["owner_id"], lead["converted_account_id"]) == (
        "converted",
        "taker",
        converted.account_id,
    )


async def test_a_transfer_and_an_engagement_batch_lock_their_leads_in_one_order(env: Any) -> None:
    """Both lock in id order, so neither waits on the other in a cycle (a deadlock, one of them
    failing), whatever order the database finds the rep's leads in."""
    first = await _lead(env, "First")
    middle = await _lead(env, "Middle", owner_id="stayer")
    last = await _lead(env, "Last")
    assert first["id"] < middle["id"] < last["id"]
    # `last` contacted, `first` updated since: the rep's leads by (owner, status), or as stored,
    # come `last` first.
    with env.acting("leaver", team="east", scope=ScopeKind.OWN):
        await env.service.log_activity(ActivityInput(last["id"], "call"))
    with _manager(env):
        await env.service.update_lead(first["id"], {"company": "Acme"}, ["company"], 0)
    blocker = await env.engine.connect()
    await blocker.begin()
    await blocker.execute(select(repo.leads.c.id).where(repo.leads.c.id == middle["id"]).with_for_update())
    when = env.clock() - timedelta(minutes=5)
    items = [
        domain.EngagementInput(kind="page_view", external_id=f"e-{x['id']}", occurred_at=when, lead_id=x["id"])
        for x in (first, middle, last)
    ]

    async def engage() -> Any:
        with env.acting("mkt", roles=("marketing",)):
            return await env.service.record_engagements(items)

    async def transfer() -> Any:
        with _manager(env):
            return await env.service.transfer_leads("leaver", "taker", "", "left", "")

    engaging = asyncio.create_task(engage())  # holds `first`, waits for `middle`
    await asyncio.sleep(0.3)
    transferring = asyncio.create_task(transfer())  # waits for `first` before it locks `last`
    await asyncio.sleep(0.3)
    await blocker.rollback()
    await blocker.close()
    results = await asyncio.gather(engaging, transferring, return_exceptions=True)

    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(results[1][1]) == sorted([first["id"], last["id"]])
