"""An update of a lead's custom values: a key no definition has (kept as a web form or a file
captured it) may be sent back as it is stored, or emptied to remove it, but not set."""

from typing import Any

import pytest
from crm_platform.errors import ValidationFailed


async def test_a_client_sends_back_the_undefined_custom_values_a_form_captured(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        form = await env.service.create_webform({"name": "Site"}, "")
    lead, _ = await env.service.submit_webform(
        form["form_key"], {"name": "W", "email": "w@x.cn", "utm_source": "baidu", "budget_band": "high"}, ""
    )
    assert lead["custom"] == {"utm_source": "baidu", "budget_band": "high"}
    with env.acting("admin", roles=("admin",)):
        echoed = (
            await env.service.update_lead(
                lead["id"], {"custom": {"utm_source": "baidu", "budget_band": "high"}}, ["custom"], 0
            )
        ).record
        assert echoed["custom"] == {"utm_source": "baidu", "budget_band": "high"}
        emptied = (
            await env.service.update_lead(
                lead["id"], {"custom": {"utm_source": "baidu", "budget_band": ""}}, ["custom"], 0
            )
        ).record
        assert emptied["custom"] == {"utm_source": "baidu"}
        for custom in ({"utm_source": "google"}, {"colour": "red"}, {"budget_band": "low"}):
            with pytest.raises(ValidationFailed) as refused:
                await env.service.update_lead(lead["id"], {"custom": custom}, ["custom"], 0)
            assert [e.field for e in refused.value.errors] == [f"custom.{next(iter(custom))}"]
