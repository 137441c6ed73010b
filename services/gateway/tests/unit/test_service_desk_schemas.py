"""The answer schemas the OpenAPI document shows for the service-desk routes
(`gateway.routers.service_desk_schemas`) are those of what the routes send: each record and each
composed answer as the router prints it, from messages with every field set, has exactly the
documented fields, each of the documented JSON type."""

from collections.abc import Mapping
from typing import Any

import pytest
from crm.servicedesk.v1 import servicedesk_pb2 as sd
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from gateway.routers import service_desk_schemas as schemas
from gateway.routers.service_desk import _created_ticket_json, _items_json, _ticket_detail_json, to_json
from gateway.testing import assert_documented, filled
from google.protobuf.message import Message
from pydantic import BaseModel

pytestmark = pytest.mark.unit


def _in_clear(record: Mapping[str, Any]) -> dict[str, Any]:
    """The presenter of a caller whose field rules show every field in clear."""
    return dict(record)


def _page(reply: Any) -> dict[str, Any]:
    """A List...Response as `service_desk._listing` (and `search_articles`) prints it."""
    return {"items": [to_json(item) for item in reply.items], "next_cursor": reply.page_info.next_cursor or None}


_RECORDS: list[tuple[type[Message], type[BaseModel]]] = [
    (sd.Ticket, schemas.Ticket),
    (sd.TicketComment, schemas.TicketComment),
    (sd.WorkLogEntry, schemas.WorkLogEntry),
    (sd.CsatResponse, schemas.CsatResponse),
    (sd.SlaPolicy, schemas.SlaPolicy),
    (sd.Agent, schemas.Agent),
    (sd.ReturnVisit, schemas.ReturnVisit),
    (sd.KbArticle, schemas.KbArticle),
]

_KEYS_ONLY: list[tuple[Message, type[BaseModel]]] = [
    (sd.Ticket(id="t1"), schemas.Ticket),
    (sd.TicketComment(id="c1"), schemas.TicketComment),
    (sd.WorkLogEntry(id="w1"), schemas.WorkLogEntry),
    (sd.CsatResponse(id="s1"), schemas.CsatResponse),
    (sd.SlaPolicy(priority="high"), schemas.SlaPolicy),
    (sd.Agent(id="u1"), schemas.Agent),
    (sd.ReturnVisit(id="v1"), schemas.ReturnVisit),
    (sd.KbArticle(id="a1"), schemas.KbArticle),
]

# The List...Response of each paged list route, and its page.
_PAGES: list[tuple[type[Message], type[BaseModel]]] = [
    (pb.ListTicketsResponse, schemas.TicketPage),
    (pb.ListCsatResponsesResponse, schemas.CsatPage),
    (pb.ListAgentsResponse, schemas.AgentPage),
    (pb.ListReturnVisitsResponse, schemas.ReturnVisitPage),
    (pb.SearchKbArticlesResponse, schemas.KbArticlePage),
]


@pytest.mark.parametrize(
    ("message_type", "model"), [pytest.param(*record, id=record[1].__name__) for record in _RECORDS]
)
def test_a_record_has_the_documented_fields_and_types(message_type: type[Message], model: type[BaseModel]) -> None:
    assert_documented(to_json(filled(message_type())), model)


@pytest.mark.parametrize(("message", "model"), [pytest.param(*record, id=record[1].__name__) for record in _KEYS_ONLY])
def test_a_record_with_only_its_key_set_is_documented(message: Message, model: type[BaseModel]) -> None:
    """Unset times print as null, an unset custom as `{}`."""
    assert_documented(to_json(message), model)


@pytest.mark.parametrize(("reply_type", "model"), [pytest.param(*page, id=page[1].__name__) for page in _PAGES])
def test_a_page_has_its_records_and_the_next_cursor(reply_type: type[Message], model: type[BaseModel]) -> None:
    reply = filled(reply_type())
    last_page = _page(reply_type(items=reply.items))

    assert_documented(_page(reply), model)
    assert_documented(last_page, model)
    assert last_page["next_cursor"] is None


def test_the_unpaged_lists_have_their_records() -> None:
    assert_documented(_items_json(filled(pb.ListSlaPoliciesResponse()).items, _in_clear), schemas.SlaPolicyList)
    assert_documented(_items_json(filled(pb.SuggestKbArticlesResponse()).items, _in_clear), schemas.SuggestedArticles)
    assert_documented({"items": []}, schemas.SuggestedArticles)  # to a caller who may not read the knowledge base


@pytest.mark.parametrize("reads_the_knowledge_base", [True, False])
def test_a_created_ticket_has_its_suggested_articles(reads_the_knowledge_base: bool) -> None:
    reply = filled(pb.CreateTicketResponse())
    present_article = _in_clear if reads_the_knowledge_base else None

    answer = _created_ticket_json(to_json(reply.ticket), reply.suggested_articles, _in_clear, present_article)

    assert_documented(answer, schemas.CreatedTicket)
    assert len(answer["suggested_articles"]) == (1 if reads_the_knowledge_base else 0)


@pytest.mark.parametrize("reads_csat", [True, False])
def test_a_ticket_has_its_comments_work_log_and_csat_answer(reads_csat: bool) -> None:
    answer = _ticket_detail_json(filled(pb.GetTicketResponse()), _in_clear, _in_clear if reads_csat else None)

    assert_documented(answer, schemas.TicketDetail)
    assert_documented(answer["comments"][0], schemas.TicketComment)
    assert (answer["csat"] is not None) == reads_csat
    assert answer["version"] == 4  # an int64 is a number


def test_a_ticket_without_a_csat_answer_shows_it_as_null() -> None:
    answer = _ticket_detail_json(pb.GetTicketResponse(ticket=sd.Ticket(id="t1")), _in_clear, _in_clear)

    assert_documented(answer, schemas.TicketDetail)
    assert answer["csat"] is None and answer["comments"] == []


def test_an_int64_printed_as_a_string_is_refused() -> None:
    """The check above can fail: a version as text, as protobuf's JSON mapping would write it, is not taken."""
    printed = to_json(filled(sd.Ticket()))
    with pytest.raises(ValueError, match="version"):
        assert_documented({**printed, "version": "4"}, schemas.Ticket)
