"""Typed custom fields filled from text. Through the real gateway and leads service on PostgreSQL,
as a user does it: a number and a bool field defined by `POST /custom-fields/lead`, then filled by a
CSV import (every cell is text) and by a web form (the gateway sends every field as text). The
text is read by the field's type, as a list filter reads `custom.visits=12`: the lead stores 12 and
true, not "12" and "true"; text that is not of the type is refused naming `custom.<key>`."""

from typing import Any

import httpx
import pytest
from leads import repository as repo
from sqlalchemy import select

pytestmark = pytest.mark.integration

FIELDS = (
    {"key": "visits_x", "label": "Visits", "type": "number"},
    {"key": "vip", "label": "VIP", "type": "bool"},
    {"key": "renewal", "label": "Renewal", "type": "date"},
    {"key": "tier", "label": "Tier", "type": "enum", "options": ["gold", "silver"]},
)


@pytest.fixture
async def admin(admin: httpx.AsyncClient) -> httpx.AsyncClient:
    """The admin's client of the gateway, with FIELDS defined."""
    for field in FIELDS:
        defined = await admin.post("/api/v1/custom-fields/lead", json=field)
        assert defined.status_code == 201, defined.text
    return admin


async def stored_custom(env: Any) -> dict[str, dict[str, Any]]:
    """Each lead's custom values as the database holds them, by name."""
    async with env.engine.connect() as conn:
        rows = await conn.execute(select(repo.leads.c.name, repo.leads.c.custom))
    return {name: custom for name, custom in rows}


async def test_a_csv_fills_number_and_bool_fields_with_typed_values(env: Any, admin: httpx.AsyncClient) -> None:
    csv_text = (
        "name,visits_x,vip,renewal,notes,tier\n"
        "V1,12,true,2026-12-01,12,Gold\n"
        "V2, 3.5 ,FALSE,,x,silver\n"
        "V3,12abc,true,,,\n"
        "V4,7,yes,,,\n"
        "V5,,,,,\n"
    )
    response = await admin.post(
        "/api/v1/leads/import?import_key=typed-cells", content=csv_text.encode(), headers={"Content-Type": "text/csv"}
    )

    assert response.status_code == 200, response.text
    progress = response.json()["import"]["progress"]
    assert (progress["accepted"], progress["rejected"]) == ("3", "2")  # int64 counts, in JSON as text
    rejected = [(row["row"], row["field"], row["reason"]) for row in response.json()["rows"]]
    assert rejected == [
        ("3", "custom.visits_x", "custom.visits_x: must be a number"),
        ("4", "custom.vip", "custom.vip: must be true or false"),
    ]
    stored = await stored_custom(env)
    # An enum's option is read from its name in any case, as people type it into a spreadsheet.
    assert stored["V1"] == {"visits_x": 12, "vip": True, "renewal": "2026-12-01", "notes": "12", "tier": "gold"}
    assert stored["V2"] == {"visits_x": 3.5, "vip": False, "notes": "x", "tier": "silver"}  # an empty cell is no value
    assert stored["V5"] == {}
    assert isinstance(stored["V1"]["visits_x"], int) and stored["V1"]["vip"] is True
    # Stored typed, the values are found by the typed list filter.
    listed = await admin.get(
        "/api/v1/leads", params={"custom.visits_x": "12", "custom.vip": "true", "custom.tier": "GOLD"}
    )
    assert listed.status_code == 200, listed.text
    assert [lead["name"] for lead in listed.json()["items"]] == ["V1"]


async def test_a_json_import_keeps_its_numbers_and_reads_its_texts(env: Any, admin: httpx.AsyncClient) -> None:
    rows = [{"name": "J1", "visits_x": 12, "vip": True}, {"name": "J2", "visits_x": "4", "vip": "false"}]
    response = await admin.post("/api/v1/leads/import?import_key=typed-json&format=json", json=rows)

    assert response.status_code == 200, response.text
    assert response.json()["import"]["progress"]["accepted"] == "2", response.text
    stored = await stored_custom(env)
    assert (stored["J1"], stored["J2"]) == ({"visits_x": 12, "vip": True}, {"visits_x": 4, "vip": False})


async def test_a_web_form_fills_number_and_bool_fields_from_json_values_and_text(
    env: Any, admin: httpx.AsyncClient
) -> None:
    with env.acting("admin", roles=("admin",)):
        form = await env.service.create_webform({"name": "Expo signup"}, "")
    path = f"/api/v1/webforms/{form['form_key']}/submissions"

    numbers = await admin.post(path, json={"name": "WN", "email": "wn@x.cn", "visits_x": 12, "vip": True, "ref": 7})
    texts = await admin.post(
        path, json={"name": "WT", "email": "wt@x.cn", "visits_x": "3.5", "vip": "false", "tier": "Silver"}
    )
    wrong = await admin.post(path, json={"name": "WW", "email": "ww@x.cn", "visits_x": "12abc", "vip": 1})

    assert (numbers.status_code, texts.status_code) == (202, 202), (numbers.text, texts.text)
    assert wrong.status_code == 422, wrong.text
    assert sorted(e["field"] for e in wrong.json()["errors"]) == ["custom.vip", "custom.visits_x"]
    stored = await stored_custom(env)
    # An undefined field keeps the text the form sent, as before.
    assert stored["WN"] == {"visits_x": 12, "vip": True, "ref": "7"}
    assert stored["WT"] == {"visits_x": 3.5, "vip": False, "tier": "silver"}
    assert "WW" not in stored


async def test_a_pii_custom_value_shown_masked_is_not_the_callers_to_set(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    """Marketing reads a pii custom value masked, like a phone: sending back the record it read would
    store the mask over the value. Setting it is refused naming the field, as a phone is (SPEC §9),
    by create, PATCH and import; other custom values stay theirs to set."""
    defined = await admin.post(
        "/api/v1/custom-fields/lead", json={"key": "nid", "label": "ID", "type": "text", "pii": True}
    )
    assert defined.status_code == 201, defined.text
    created = await admin.post("/api/v1/leads", json={"name": "Pii", "custom": {"nid": "110101199001011234"}})
    lead = created.json()
    marketing = bearer("mkt1", "marketing")

    read = await admin.get(f"/api/v1/leads/{lead['id']}", headers=marketing)
    sent_back = await admin.patch(
        f"/api/v1/leads/{lead['id']}",
        json={"custom": {**read.json()["custom"], "visits_x": 3}},
        headers={**marketing, "If-Match": read.headers["ETag"]},
    )
    new_one = await admin.post("/api/v1/leads", json={"name": "Mkt", "custom": {"nid": "1"}}, headers=marketing)
    imported = await admin.post(
        "/api/v1/leads/import?import_key=mkt-pii",
        content=b"name,nid\nImp,12345\n",
        headers={**marketing, "Content-Type": "text/csv"},
    )
    others = await admin.patch(f"/api/v1/leads/{lead['id']}", json={"custom": {"visits_x": 3}}, headers=marketing)

    assert read.json()["custom"]["nid"] == "1***"
    for refused in (sent_back, new_one, imported):
        assert refused.status_code == 403, refused.text
        assert refused.json()["errors"][0]["field"] == "custom.nid"
    assert others.status_code == 200, others.text
    assert (await admin.get(f"/api/v1/leads/{lead['id']}")).json()["custom"]["nid"] == "110101199001011234"


async def test_a_json_rows_custom_object_is_read_and_checked_as_post_leads_reads_it(
    env: Any, admin: httpx.AsyncClient
) -> None:
    rows = [{"name": "JC1", "custom": {"visits_x": 5, "vip": "true"}}, {"name": "JC2", "custom": {"visits_x": "many"}}]
    response = await admin.post("/api/v1/leads/import?import_key=custom-object&format=json", json=rows)

    assert response.status_code == 200, response.text
    assert [(row["row"], row["field"]) for row in response.json()["rows"]] == [("2", "custom.visits_x")]
    stored = await stored_custom(env)
    assert stored["JC1"] == {"visits_x": 5, "vip": True} and "JC2" not in stored
