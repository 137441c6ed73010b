"""Which contact a conversion links, and what a converted lead answers when asked again.

Into an existing account, the contact the lead matched is linked when it is a live contact of that
account: none is created, the lead and its event carry it, a deal takes it, and undoing the attempt
leaves it. Otherwise (a new account, a contact of another account, a contact gone) one is created as
before. A converted lead asked again for nothing new answers with its links; asked for another
account or for an opportunity it did not get, it refuses (409 ILLEGAL_TRANSITION)."""

import asyncio
from typing import Any

import grpc
import pytest
from accounts import repository as accounts_repo
from accounts.handlers import merge_accounts
from accounts.servicer import AccountsServicer
from crm.accounts.v1 import accounts_pb2
from crm.leads.v1 import events_pb2
from crm_platform.errors import Conflict, Unavailable, ValidationFailed
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.consumers import apply_contact
from leads.handlers import ConvertRequest, ConvertResult
from sqlalchemy import select

pytestmark = pytest.mark.integration

EMAIL = "mc@match.cn"


async def contact_known(env: Any, contact_id: str, email: str = EMAIL) -> None:
    """Accounts published the contact: leads of its email are linked to it (`matched_contact_id`)."""
    async with env.service.uow.begin() as tx:
        await apply_contact(tx, accounts_pb2.Contact(id=contact_id, email=email, version=1), "86")


async def matched_lead(env: Any, contact_id: str) -> dict[str, Any]:
    """A lead of `EMAIL`, matched to the contact `contact_id` (which the fake accounts may or may not hold)."""
    await contact_known(env, contact_id)
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Match Person", "email": EMAIL, "owner_id": "rep1"})
    assert lead["matched_contact_id"] == contact_id
    return dict(lead)


async def converted_event(env: Any, lead_id: str) -> events_pb2.LeadConverted:
    (payload,) = [p for t, p in await outbox_events(env.engine, repo.metadata, lead_id) if t.endswith(".converted")]
    return events_pb2.LeadConverted.FromString(payload)


async def saga_row(env: Any, lead_id: str) -> Any:
    async with env.engine.connect() as conn:
        return (await conn.execute(select(repo.conversions).where(repo.conversions.c.lead_id == lead_id))).one()


async def interrupted_conversion(env: Any, name: str, company: str) -> dict[str, Any]:
    """A lead of rep1 whose conversion with an opportunity stopped at the deal (sales down, 503): the
    attempt holds the account and contact it made, and is `running`. Sales is back afterwards."""
    lead, _ = await env.service.create_lead({"name": name, "company": company, "owner_id": "rep1"})
    env.ports.fail["opportunity"] = Unavailable("sales down")
    with pytest.raises(Unavailable):
        await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
    del env.ports.fail["opportunity"]
    return dict(lead)


async def test_a_conversion_into_the_account_of_the_matched_contact_links_that_contact(env: Any) -> None:
    env.ports.accounts["acc"] = "MatchAcc"
    env.ports.contacts["c-1"] = "acc"
    lead = await matched_lead(env, "c-1")
    deals: list[str] = []
    create_opportunity = env.ports.create_opportunity

    async def noting_the_contact(**kw: Any) -> str:
        deals.append(kw["contact_id"])
        return str(await create_opportunity(**kw))

    env.ports.create_opportunity = noting_the_contact

    with env.acting():
        result = await env.service.convert(
            ConvertRequest(lead["id"], account_id="acc", create_opportunity=True, idempotency_key="conv-match")
        )
        again = await env.service.convert(
            ConvertRequest(lead["id"], account_id="acc", create_opportunity=True, idempotency_key="conv-match")
        )

    assert result.contact_id == "c-1" and result.lead["converted_contact_id"] == "c-1"
    assert env.ports.contacts == {"c-1": "acc"}  # none created
    assert "create_contact" not in env.ports.calls
    assert deals == ["c-1"]  # the deal's primary contact is the linked one
    assert (await converted_event(env, lead["id"])).contact_id == "c-1"
    assert (again.account_id, again.contact_id, again.opportunity_id) == (
        result.account_id, result.contact_id, result.opportunity_id,
    )  # fmt: skip


@pytest.mark.parametrize("where", ["another account", "deleted"])
async def test_a_matched_contact_of_another_account_or_gone_is_not_linked_a_contact_is_created(
    env: Any, where: str
) -> None:
    env.ports.accounts.update({"acc": "MatchAcc", "other": "OtherAcc"})
    if where == "another account":
        env.ports.contacts["c-1"] = "other"
    lead = await matched_lead(env, "c-1")

    with env.acting():
        result = await env.service.convert(ConvertRequest(lead["id"], account_id="acc"))

    assert result.contact_id not in ("", "c-1")
    assert env.ports.contacts[result.contact_id] == "acc"
    assert result.lead["converted_contact_id"] == result.contact_id


async def test_a_conversion_into_a_new_account_creates_its_contact_without_asking_for_the_matched_one(
    env: Any,
) -> None:
    env.ports.contacts["c-1"] = "acc"
    lead = await matched_lead(env, "c-1")

    with env.acting():
        result = await env.service.convert(ConvertRequest(lead["id"]))

    assert env.ports.calls == ["create_account", "create_contact"]
    assert env.ports.contacts[result.contact_id] == result.account_id != "acc"


async def test_an_undone_conversion_leaves_the_contact_it_linked(env: Any) -> None:
    env.ports.accounts["acc"] = "MatchAcc"
    env.ports.contacts["c-1"] = "acc"
    lead = await matched_lead(env, "c-1")
    env.ports.fail["opportunity"] = ValidationFailed([])

    with env.acting():
        with pytest.raises(ValidationFailed):
            await env.service.convert(ConvertRequest(lead["id"], account_id="acc", create_opportunity=True))
        assert env.ports.contacts == {"c-1": "acc"} and env.ports.accounts == {"acc": "MatchAcc"}
        assert "delete_contact" not in env.ports.calls and "delete_account" not in env.ports.calls
        saga = await saga_row(env, lead["id"])
        assert (saga.state, saga.contact_id, saga.contact_created) == ("compensated", "", False)
        assert (await env.service.get_lead(lead["id"]))["status"] == "new"

        env.ports.fail = {}
        result = await env.service.convert(ConvertRequest(lead["id"], account_id="acc", create_opportunity=True))
    assert result.contact_id == "c-1" and env.ports.contacts == {"c-1": "acc"}


async def test_an_undone_conversion_into_a_new_account_still_deletes_the_contact_it_created(env: Any) -> None:
    env.ports.contacts["c-1"] = "acc"
    lead = await matched_lead(env, "c-1")
    env.ports.fail["opportunity"] = ValidationFailed([])

    with env.acting(), pytest.raises(ValidationFailed):
        await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))

    assert env.ports.contacts == {"c-1": "acc"} and env.ports.accounts == {}
    assert env.ports.calls[-2:] == ["delete_contact", "delete_account"]


async def test_a_conversion_whose_contact_lookup_is_unavailable_links_the_contact_on_retry(env: Any) -> None:
    env.ports.accounts["acc"] = "MatchAcc"
    env.ports.contacts["c-1"] = "acc"
    lead = await matched_lead(env, "c-1")
    env.ports.fail["get_contact"] = Unavailable("accounts down")

    with env.acting():
        with pytest.raises(Unavailable):
            await env.service.convert(ConvertRequest(lead["id"], account_id="acc"))
        env.ports.fail = {}
        result = await env.service.convert(ConvertRequest(lead["id"], account_id="acc"))

    assert result.contact_id == "c-1" and env.ports.contacts == {"c-1": "acc"}


async def test_a_retried_attempt_that_chose_to_create_its_contact_resumes_that_create(env: Any) -> None:
    # The matched contact is at another company when the attempt chooses; its create is cut off.
    env.ports.accounts.update({"acc": "MatchAcc", "other": "OtherAcc"})
    env.ports.contacts["c-1"] = "other"
    lead = await matched_lead(env, "c-1")
    env.ports.fail["contact"] = Unavailable("accounts down")
    with env.acting():
        with pytest.raises(Unavailable):
            await env.service.convert(ConvertRequest(lead["id"], account_id="acc"))
        # Meanwhile the contact moves to the account: the attempt keeps its choice (and its key),
        # so a contact the lost create may have made is never left beside a linked one.
        env.ports.contacts["c-1"] = "acc"
        env.ports.fail = {}
        result = await env.service.convert(ConvertRequest(lead["id"], account_id="acc"))

    assert result.contact_id != "c-1"
    assert env.ports.calls.count("get_contact") == 1
    (contact_key,) = [k for k, v in env.ports.keys.items() if v == result.contact_id]
    assert contact_key.endswith(":contact")


async def test_a_converted_lead_asked_for_nothing_new_answers_with_its_links(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Zhao", "company": "Zhao Co", "owner_id": "rep1"})
        first = await env.service.convert(ConvertRequest(lead["id"]))
        links = (first.account_id, first.contact_id, first.opportunity_id)
        for repeated in (
            ConvertRequest(lead["id"]),
            ConvertRequest(lead["id"], account_id=first.account_id),
            ConvertRequest(lead["id"], account_name="Another name"),
        ):
            again = await env.service.convert(repeated)
            assert (again.account_id, again.contact_id, again.opportunity_id) == links
    assert len(env.ports.accounts) == len(env.ports.contacts) == 1


async def test_a_converted_lead_asked_for_another_account_or_a_missing_opportunity_refuses(env: Any) -> None:
    env.ports.accounts["acc-2"] = "Elsewhere"
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Sun", "company": "Sun Co", "owner_id": "rep1"})
        first = await env.service.convert(ConvertRequest(lead["id"]))
        with pytest.raises(Conflict) as other_account:
            await env.service.convert(ConvertRequest(lead["id"], account_id="acc-2", create_opportunity=True))
        with pytest.raises(Conflict) as with_deal:
            await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
        unchanged = await env.service.get_lead(lead["id"])

    assert other_account.value.reason == with_deal.value.reason == "ILLEGAL_TRANSITION"
    assert f"account {first.account_id}, contact {first.contact_id}" in other_account.value.detail
    assert "account acc-2 and an opportunity" in other_account.value.detail
    assert "no opportunity" in with_deal.value.detail
    assert env.ports.opportunities == {} and len(env.ports.contacts) == 1
    assert unchanged["converted_account_id"] == first.account_id and unchanged["converted_opportunity_id"] == ""


async def test_a_lead_converted_with_an_opportunity_answers_a_repeat_asking_for_one(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Wu", "company": "Wu Co", "owner_id": "rep1"})
        first = await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
        again = await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
    assert again.opportunity_id == first.opportunity_id != ""
    assert len(env.ports.opportunities) == 1


async def test_with_the_real_accounts_service_a_conversion_links_the_matched_contact(
    env: Any, accounts_over_grpc: Any
) -> None:
    async with accounts_over_grpc() as (_, accounts_db):
        ports = env.service.ports
        with env.acting("rep1"):
            lead, _ = await env.service.create_lead({"name": "Match Person", "email": EMAIL, "owner_id": "rep1"})
            other, _ = await env.service.create_lead({"name": "Other Person", "email": "op@match.cn"})
            # The account and its contact, made as a user would (their keys are nobody's saga's).
            account_id = await ports.create_account(key="setup-account", lead=lead, name="MatchAcc")
            elsewhere = await ports.create_account(key="setup-elsewhere", lead=lead, name="OtherAcc")
            contact_id = await ports.create_contact(key="setup-contact", account_id=account_id, lead=lead)
            away_id = await ports.create_contact(key="setup-away", account_id=elsewhere, lead=other)
            await contact_known(env, contact_id)
            await contact_known(env, away_id, "op@match.cn")
            linked = await env.service.convert(ConvertRequest(lead["id"], account_id=account_id))
            created = await env.service.convert(ConvertRequest(other["id"], account_id=account_id))

        async with accounts_db.connect() as conn:
            c = accounts_repo.contacts.c
            contacts = (await conn.execute(select(c.id, c.account_id).order_by(c.created_at, c.id))).all()
    assert linked.contact_id == contact_id and linked.lead["converted_contact_id"] == contact_id
    assert created.contact_id not in (contact_id, away_id)
    assert sorted(contacts) == sorted(
        [(contact_id, account_id), (away_id, elsewhere), (created.contact_id, account_id)]
    )


async def test_a_conversion_into_a_merged_away_account_is_refused_naming_the_survivor(
    env: Any, accounts_over_grpc: Any
) -> None:
    """A merged-away account is only a pointer: a deal on it would be missing from the survivor's
    pipeline. Named by a conversion, it is refused as `POST /opportunities` refuses it."""
    async with accounts_over_grpc() as (accounts, _):
        ports = env.service.ports
        with env.acting("rep1"):
            lead, _ = await env.service.create_lead({"name": "Merge Person", "owner_id": "rep1"})
            survivor = await ports.create_account(key="setup-survivor", lead=lead, name="Survivor")
            duplicate = await ports.create_account(key="setup-duplicate", lead=lead, name="Duplicate")
            await merge_accounts(accounts.ctx, survivor, duplicate, idempotency_key="")
            with pytest.raises(ValidationFailed) as refused:
                await env.service.convert(
                    ConvertRequest(lead["id"], account_id=duplicate, create_opportunity=True, idempotency_key="c-m")
                )
            converted = await env.service.convert(ConvertRequest(lead["id"], account_id=survivor))

    assert [(e.field, e.message) for e in refused.value.errors] == [
        ("account_id", f"account {duplicate} was merged into {survivor}")
    ]
    assert converted.account_id == survivor


async def test_a_retry_naming_another_account_undoes_the_interrupted_attempt_and_converts_into_that_account(
    env: Any,
) -> None:
    """Sales was down after the attempt created its account: a retry into an account of the caller's
    choosing gets that account, and the attempt's own account and contact are deleted, not kept
    beside it (or answered in its place)."""
    env.ports.accounts["chosen"] = "Chosen"
    with env.acting():
        lead = await interrupted_conversion(env, "Wang Wu", "Auto Co")
        assert sorted(env.ports.accounts.values()) == ["Auto Co", "Chosen"]

        result = await env.service.convert(ConvertRequest(lead["id"], account_id="chosen", create_opportunity=True))

    assert result.account_id == result.lead["converted_account_id"] == "chosen"
    assert env.ports.accounts == {"chosen": "Chosen"}  # the interrupted attempt's account is gone
    assert env.ports.contacts == {result.contact_id: "chosen"}
    assert env.ports.opportunities == {result.opportunity_id: "chosen"}


async def test_a_retry_asking_for_the_same_account_resumes_the_interrupted_attempt(env: Any) -> None:
    with env.acting():
        lead = await interrupted_conversion(env, "Zhao Liu", "Same Co")
        [first_account] = env.ports.accounts
        result = await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))

    assert result.account_id == first_account
    assert "delete_account" not in env.ports.calls and env.ports.calls.count("create_account") == 1


async def test_disqualifying_a_lead_whose_conversion_was_interrupted_undoes_the_attempt(env: Any) -> None:
    """A disqualified lead will never convert: what its interrupted attempt created is deleted with
    the disqualification, and while that cannot be done the lead stays as it is (Unavailable)."""
    with env.acting():
        lead = await interrupted_conversion(env, "Qian Qi", "Gone Co")
        env.ports.fail["delete_account"] = Unavailable("accounts down")
        with pytest.raises(Unavailable):
            await env.service.disqualify(lead["id"], "no budget", 0)
        assert (await env.service.get_lead(lead["id"]))["status"] == "new"

        del env.ports.fail["delete_account"]
        disqualified = (await env.service.disqualify(lead["id"], "no budget", 0)).record

    assert disqualified["status"] == "unqualified"
    assert env.ports.accounts == env.ports.contacts == {}
    assert (await saga_row(env, lead["id"])).state == "compensated"


@pytest.mark.parametrize("step", ["account", "contact", "opportunity"])
async def test_an_undone_attempt_whose_create_answer_was_lost_leaves_nothing_behind(env: Any, step: str) -> None:
    """Accounts (or sales) made the step's record, but its answer never came back: the attempt does
    not know the record's id. Disqualifying the lead, by someone else, asks the upstream what the
    step's key made, and deletes it with the rest."""
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Sun Ba", "company": "Lost Answer Co", "owner_id": "rep1"})
        env.ports.answer_lost.add(step)
        with pytest.raises(Unavailable):
            await env.service.convert(ConvertRequest(lead["id"], create_opportunity=True))
        env.ports.answer_lost.clear()
    made = {"account": env.ports.accounts, "contact": env.ports.contacts, "opportunity": env.ports.opportunities}
    assert made[step], "the upstream made the record"

    with env.acting("manager1", roles=("sales_manager",)):
        disqualified = (await env.service.disqualify(lead["id"], "no budget", 0)).record

    assert disqualified["status"] == "unqualified"
    assert env.ports.accounts == env.ports.contacts == env.ports.opportunities == {}
    assert f"replay_{step}" in env.ports.calls
    assert (await saga_row(env, lead["id"])).state == "compensated"


class AccountsLosingTheFirstAnswer(AccountsServicer):
    """Creates the first account, then answers as if the call had timed out."""

    lost = False

    async def CreateAccount(self, request: Any, context: Any) -> Any:
        reply = await super().CreateAccount(request, context)
        if not AccountsLosingTheFirstAnswer.lost:
            AccountsLosingTheFirstAnswer.lost = True
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return reply


async def test_with_the_real_accounts_service_an_account_whose_answer_was_lost_is_found_and_undone(
    env: Any, accounts_over_grpc: Any
) -> None:
    """The rep's conversion made its account, but the answer was lost; the manager disqualifies the
    lead. The account is found under the step's key (whoever asks) and deleted."""
    async with accounts_over_grpc(AccountsLosingTheFirstAnswer) as (_, accounts_db):
        with env.acting("rep1"):
            lead, _ = await env.service.create_lead({"name": "Zhou Jiu", "company": "Timeout Co", "owner_id": "rep1"})
            with pytest.raises(Unavailable):
                await env.service.convert(ConvertRequest(lead["id"]))

        async def unused(account_id: str, **_: str) -> bool:
            return False  # sales is not served here: the account holds no deal

        env.service.ports.account_used_besides = unused
        with env.acting("manager1", roles=("sales_manager",)):
            await env.service.disqualify(lead["id"], "no budget", 0)
        async with accounts_db.connect() as conn:
            a = accounts_repo.accounts.c
            accounts = (await conn.execute(select(a.name, a.deleted_at.is_not(None)))).all()

    assert accounts == [("Timeout Co", True)]
    assert (await saga_row(env, lead["id"])).state == "compensated"


async def test_a_disqualification_waits_for_a_conversion_under_way_and_undoes_nothing_of_it(env: Any) -> None:
    """Only an attempt nobody is running is undone: a conversion still making its records (here,
    waiting on sales for the deal) is waited for, then the lead is converted and stays so."""
    creating_deal, sales_answers = asyncio.Event(), asyncio.Event()
    create_opportunity = env.ports.create_opportunity

    async def slow_sales(**kwargs: Any) -> str:
        creating_deal.set()
        await sales_answers.wait()
        return await create_opportunity(**kwargs)

    env.ports.create_opportunity = slow_sales
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Wu Shi", "company": "Busy Co", "owner_id": "rep1"})
        converting = asyncio.create_task(env.service.convert(ConvertRequest(lead["id"], create_opportunity=True)))
        await creating_deal.wait()
        disqualifying = asyncio.create_task(env.service.disqualify(lead["id"], "no budget", 0))
        await asyncio.sleep(0.3)
        assert not disqualifying.done(), "the disqualification went ahead of the conversion under way"
        assert len(env.ports.accounts) == len(env.ports.contacts) == 1  # nothing undone meanwhile
        sales_answers.set()
        converted = await converting
        with pytest.raises(Conflict):
            await disqualifying

    assert converted.lead["status"] == "converted"
    assert list(env.ports.accounts) == [converted.account_id] and list(env.ports.contacts) == [converted.contact_id]
    assert "delete_account" not in env.ports.calls and "delete_contact" not in env.ports.calls
    assert (await env.service.get_lead(lead["id"]))["status"] == "converted"


async def test_an_interrupted_conversions_account_someone_has_worked_on_since_is_kept(env: Any) -> None:
    """The attempt's account got a contact of a rep's own while sales was down: it is a customer now.
    Disqualifying the lead leaves it with everything on it; only an unused account is deleted."""
    with env.acting():
        lead = await interrupted_conversion(env, "Sun Ba", "Kept Co")
        [account_id] = env.ports.accounts
        env.ports.contacts["c-added"] = account_id  # a rep's own contact on the new account
        disqualified = (await env.service.disqualify(lead["id"], "no budget", 0)).record

    assert disqualified["status"] == "unqualified"
    assert list(env.ports.accounts) == [account_id] and "c-added" in env.ports.contacts
    assert len(env.ports.contacts) == 2  # the attempt's contact stays with its account
    assert "delete_account" not in env.ports.calls and "delete_contact" not in env.ports.calls
    assert (await saga_row(env, lead["id"])).state == "compensated"


async def test_a_retry_naming_the_account_the_interrupted_attempt_made_resumes_it(env: Any) -> None:
    with env.acting():
        lead = await interrupted_conversion(env, "Zhou Jiu", "Named Co")
        [made] = env.ports.accounts
        result = await env.service.convert(ConvertRequest(lead["id"], account_id=made, create_opportunity=True))
    assert result.account_id == made and "delete_account" not in env.ports.calls


async def test_a_retry_refused_for_its_account_leaves_the_interrupted_attempt_as_it_was(env: Any) -> None:
    with env.acting():
        lead = await interrupted_conversion(env, "Wu Shi", "Left Co")
        with pytest.raises(ValidationFailed):
            await env.service.convert(ConvertRequest(lead["id"], account_id="no-such-account"))
    assert list(env.ports.accounts.values()) == ["Left Co"]
    assert (await saga_row(env, lead["id"])).state == "running"


async def test_concurrent_conversions_of_a_lead_into_different_accounts_convert_it_once_and_refuse_the_rest(
    env_each_database: Any,
) -> None:
    env = env_each_database
    accounts = ["acc-0", "acc-1", "acc-2"]
    env.ports.accounts.update({account: account for account in accounts})
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Race", "company": "Race Co", "owner_id": "rep1"})
        answers = await asyncio.gather(
            *(env.service.convert(ConvertRequest(lead["id"], account_id=account)) for account in accounts),
            return_exceptions=True,
        )

    (converted,) = [answer for answer in answers if isinstance(answer, ConvertResult)]
    refused = [answer for answer in answers if isinstance(answer, Conflict)]
    assert len(refused) == 2, answers
    assert set(env.ports.contacts.values()) == {converted.account_id}  # no contact left at another account
    stored = await env.service.get_lead(lead["id"])
    assert (stored["converted_account_id"], stored["converted_contact_id"]) == (
        converted.account_id,
        converted.contact_id,
    )


async def test_concurrent_conversions_asking_for_an_opportunity_never_answer_one_without_it(
    env_each_database: Any,
) -> None:
    env = env_each_database
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Deal", "company": "Deal Co", "owner_id": "rep1"})
        answers = await asyncio.gather(
            env.service.convert(ConvertRequest(lead["id"], account_name="Deal Co")),
            env.service.convert(ConvertRequest(lead["id"], account_name="Deal Co", create_opportunity=True)),
            return_exceptions=True,
        )

    asked = answers[1]
    assert isinstance(asked, Conflict) or (isinstance(asked, ConvertResult) and asked.opportunity_id), answers
    assert len(env.ports.accounts) == 1
