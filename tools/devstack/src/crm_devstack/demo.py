"""Demo data for `make run`, written through the public REST API (so it obeys every rule a user's
data does). Only an empty system is seeded; a restart keeps what is there."""

import httpx

# (name, industry, region, tier, contact, title, email, phone)
ACCOUNTS = [
    (
        "华东精密制造有限公司",
        "manufacturing",
        "cn-east",
        "A",
        "王磊",
        "采购总监",
        "wang.lei@hd-precision.example",
        "+86 138 0013 8000",
    ),
    (
        "Northwind Logistics",
        "logistics",
        "cn-north",
        "B",
        "Anna Li",
        "COO",
        "anna.li@northwind.example",
        "+86 139 1111 2222",
    ),
    ("云帆软件科技", "software", "cn-south", "A", "陈静", "CTO", "chen.jing@yunfan.example", "+86 137 2222 3333"),
    (
        "Blue Harbor Retail",
        "retail",
        "cn-east",
        "C",
        "Tom Zhang",
        "IT Manager",
        "tom.zhang@blueharbor.example",
        "+86 136 3333 4444",
    ),
    (
        "金桥医疗器械",
        "healthcare",
        "cn-north",
        "B",
        "刘洋",
        "运营经理",
        "liu.yang@jinqiao.example",
        "+86 135 4444 5555",
    ),
]

LEADS = [
    ("赵敏", "启明教育", "zhao.min@qiming.example", "+86 131 0000 1111", "website", "cn-east", "education"),
    ("Kevin Wu", "Sunrise Foods", "kevin.wu@sunrise.example", "+86 132 0000 2222", "event", "cn-south", "food"),
    ("孙悦", "远航物流", "sun.yue@yuanhang.example", "+86 133 0000 3333", "referral", "cn-north", "logistics"),
    ("Maria Chen", "Orbit Telecom", "maria.chen@orbit.example", "+86 134 0000 4444", "webform", "cn-east", "telecom"),
    ("周杰", "鼎新建材", "zhou.jie@dingxin.example", "+86 135 0000 5555", "ad", "cn-south", "construction"),
    (
        "Lily Huang",
        "Green Leaf Pharma",
        "lily.huang@greenleaf.example",
        "+86 136 0000 6666",
        "wechat",
        "cn-north",
        "healthcare",
    ),
]


# Scoring and routing set up before the leads come in, so the demo leads arrive scored, graded and
# assigned as a configured CRM's would: east-China leads go round robin to two reps of team east
# (`make token ARGS="--sub u1 --roles sales_rep --team east --region cn-east"` to be one of them).
SCORING_RULES: list[dict[str, object]] = [
    {"name": "Referred", "field": "source", "operator": "equals", "value": "referral", "points": 30},
    {"name": "Met at an event", "field": "source", "operator": "equals", "value": "event", "points": 20},
    {
        "name": "Target industry",
        "field": "industry",
        "operator": "in",
        "value": "software,healthcare,telecom",
        "points": 25,
    },
    {"name": "Reachable by phone", "field": "phone", "operator": "present", "points": 10},
    {"name": "Called twice", "activity_kind": "call", "min_count": 2, "points": 15},
]
ASSIGNMENT_RULES: list[dict[str, object]] = [
    {"name": "East China", "regions": ["cn-east"], "team": "east", "user_ids": ["u1", "u2"], "capacity": 50},
]
CAMPAIGN: dict[str, object] = {
    "name": "Spring expo 2027",
    "channel": "event",
    "cost": {"amount": "30000.00", "currency": "CNY"},
    "starts_on": "2027-03-01",
    "ends_on": "2027-03-03",
}


async def seed_if_empty(client: httpx.AsyncClient) -> str:
    """Seeds accounts with contacts and an opportunity each, lead scoring and assignment rules, a
    campaign, and open leads; says what it did."""
    existing = await client.get("/api/v1/accounts", params={"limit": 1})
    existing.raise_for_status()
    if existing.json()["items"]:
        return "kept the existing data"
    for index, (name, industry, region, tier, contact, title, email, phone) in enumerate(ACCOUNTS):
        account = await _create(
            client,
            "/api/v1/accounts",
            {"name": name, "industry": industry, "region": region, "tier": tier, "tags": ["demo"]},
            key=f"demo-account-{index}",
        )
        await _create(
            client,
            f"/api/v1/accounts/{account['id']}/contacts",
            {
                "name": contact,
                "title": title,
                "email": email,
                "phone": phone,
                "decision_role": "decision_maker",
                "is_primary": True,
            },
            key=f"demo-contact-{index}",
        )
        await _create(
            client,
            "/api/v1/opportunities",
            {
                "account_id": account["id"],
                "name": f"{name} — platform rollout",
                "amount": {"amount": f"{(index + 1) * 120000}.00", "currency": "CNY"},
                "expected_close_date": "2027-03-31",
                "product_line": f"line-{index}",
            },
            key=f"demo-opportunity-{index}",
        )
    return f"{len(ACCOUNTS)} accounts with contacts and opportunities, {await seed_leads(client)}"


async def seed_leads(client: httpx.AsyncClient) -> str:
    """The lead rules, a campaign and the leads, which arrive scored and routed by the rules."""
    for index, rule in enumerate(SCORING_RULES):
        await _create(client, "/api/v1/lead-scoring-rules", rule, key=f"demo-scoring-rule-{index}")
    for index, rule in enumerate(ASSIGNMENT_RULES):
        await _create(client, "/api/v1/lead-assignment-rules", rule, key=f"demo-assignment-rule-{index}")
    campaign = await _create(client, "/api/v1/campaigns", CAMPAIGN, key="demo-campaign")
    for index, (name, company, email, phone, source, region, industry) in enumerate(LEADS):
        await _create(
            client,
            "/api/v1/leads",
            {
                "name": name,
                "company": company,
                "email": email,
                "phone": phone,
                "source": source,
                "region": region,
                "industry": industry,
                "tags": ["demo"],
                **({"campaign_id": campaign["id"]} if source == "event" else {}),
            },
            key=f"demo-lead-{index}",
        )
    return f"{len(LEADS)} leads (scored by {len(SCORING_RULES)} rules, east China's assigned to u1 and u2), a campaign"


async def _create(client: httpx.AsyncClient, path: str, body: dict[str, object], *, key: str) -> dict[str, object]:
    response = await client.post(path, json=body, headers={"Idempotency-Key": key})
    if response.status_code >= 400:
        raise RuntimeError(f"seeding {path} failed: {response.status_code} {response.text}")
    created: dict[str, object] = response.json()
    return created
