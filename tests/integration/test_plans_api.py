"""Plans and categories through the HTTP API of the shared stack (its operator zone is
Asia/Shanghai, its model is in category `general`), with the official `openai` client: a tenant
whose only package is for another category gets 429 `insufficient_quota` naming the category; one
key spends every package that covers the model, trial first; `/v1/usage` shows each live package's
balance, category and renewal to its own key only; operator mistakes are 4xx, never 500."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL, bearer

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def admin(base_url, keys):
    with httpx.Client(base_url=base_url, headers=bearer(keys.admin), timeout=30) as c:
        for plan in (
            {"name": "coder-pack", "kind": "pack", "tokens": 5_000, "price": "1", "category": "coding"},
            {"name": "general-trial", "kind": "trial", "tokens": 2_000, "valid_days": 30, "category": "general"},
            {"name": "general-month", "kind": "monthly", "tokens": 3_000, "price": "9.9", "rollover": True},
        ):
            r = c.post("/admin/plans", json=plan)
            assert r.status_code == 201, r.text
        yield c


def _tenant(admin: httpx.Client, name: str) -> str:
    assert admin.post("/admin/tenants", json={"name": name}).status_code == 201
    return admin.post("/admin/keys", json={"tenant": name}).json()["key"]


def _chat(base_url: str, key: str):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)
    return client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Plan my day."}], max_tokens=8
    )


def test_a_package_for_another_category_is_refused_with_429_naming_it(base_url, admin):
    key = _tenant(admin, "plans-coder")
    assert admin.post("/admin/purchases", json={"tenant": "plans-coder", "plan": "coder-pack"}).status_code == 201
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(base_url, key)
    body = refused.value.body
    assert refused.value.status_code == 429 and body["code"] == "insufficient_quota"
    assert "category 'general'" in body["message"] and "they cover coding" in body["message"]
    # The same key, once a package covers the model, is served: trial first, the coding pack untouched.
    assert admin.post("/admin/purchases", json={"tenant": "plans-coder", "plan": "general-trial"}).status_code == 201
    answer = _chat(base_url, key)
    usage = httpx.get(base_url + "/v1/usage", headers=bearer(key), timeout=30).json()
    by_kind = {p["kind"]: p for p in usage["packages"]}
    assert by_kind["trial"]["tokens_used"] == answer.usage.factory_tokens > 0
    assert by_kind["trial"]["category"] == "general" and by_kind["trial"]["plan"] == "general-trial"
    assert (by_kind["pack"]["category"], by_kind["pack"]["tokens_used"]) == ("coding", 0)
    assert by_kind["trial"]["renews_at"] is None


def test_a_subscription_shows_its_renewal_in_the_operators_zone_to_its_own_key_only(base_url, admin, keys):
    key = _tenant(admin, "plans-monthly")
    r = admin.post("/admin/purchases", json={"tenant": "plans-monthly", "plan": "general-month"})
    assert r.status_code == 201, r.text
    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    first_of_next = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=ZoneInfo("Asia/Shanghai"))
    _chat(base_url, key)
    [month] = httpx.get(base_url + "/v1/usage", headers=bearer(key), timeout=30).json()["packages"]
    assert month["kind"] == "monthly" and month["category"] is None and month["rolled_in"] == 0
    assert datetime.fromisoformat(month["renews_at"]) == first_of_next  # midnight on the 1st, Shanghai
    assert 0 < month["tokens_used"] and month["tokens_available"] == 3_000 - month["tokens_used"]
    others = httpx.get(base_url + "/v1/usage", headers=bearer(keys.tenant), timeout=30).json()
    assert all(p.get("plan") != "general-month" for p in others["packages"])
    # Cancelled: it still runs out with the month, and no longer renews.
    assert admin.delete("/admin/subscriptions/plans-monthly/general-month").status_code == 200
    [month] = httpx.get(base_url + "/v1/usage", headers=bearer(key), timeout=30).json()["packages"]
    assert month["renews_at"] is None and month["tokens_available"] > 0


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("post", "/admin/plans", {"name": "t", "kind": "trial", "tokens": 5}, 400),  # a trial must expire
        ("post", "/admin/plans", {"name": "w", "kind": "weekly", "tokens": 5}, 400),
        ("post", "/admin/plans", {"name": "coder-pack", "kind": "pack", "tokens": 5}, 400),  # exists
        ("post", "/admin/purchases", {"tenant": "plans-coder", "plan": "no-such-plan"}, 400),
        ("post", "/admin/purchases", {"tenant": "plans-coder", "plan": "general-trial"}, 400),  # a second trial
        ("post", "/admin/purchases", {"tenant": "nobody", "plan": "coder-pack"}, 404),
        ("delete", "/admin/subscriptions/plans-coder/general-month", None, 404),
        ("delete", "/admin/plans/no-such-plan", None, 400),
    ],
)
def test_operator_mistakes_are_openai_shaped_4xx(admin, method, path, body, status):
    r = admin.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_the_admin_statement_ties_out_to_the_tenants_usage_rows(base_url, admin):
    """This month's statement (the operator's zone) of the tenant the first test served: its totals
    are the sums of the tenant's usage rows over the same month, to the last digit."""
    from decimal import Decimal

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    month = f"{now.year:04d}-{now.month:02d}"
    doc = admin.get("/admin/statements", params={"tenant": "plans-coder", "month": month}).json()
    start = datetime(now.year, now.month, 1, tzinfo=ZoneInfo("Asia/Shanghai"))
    rows = admin.get("/admin/usage", params={"tenant": "plans-coder", "since": start.isoformat()}).json()["data"]
    [total] = doc["totals"]
    assert total["requests"] == len(rows) >= 1
    assert total["billed_tokens"] == sum(r["billed_tokens"] for r in rows)
    assert Decimal(total["cost"]) == sum(Decimal(r["cost"]) for r in rows)
    assert [u["category"] for u in doc["usage"]] == ["general"]
    assert {b["plan"] for b in doc["bought"]} == {"coder-pack", "general-trial"}
    csv_text = admin.get("/admin/statements", params={"tenant": "plans-coder", "month": month, "format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("section,model,category,currency,requests")
    bad = admin.get("/admin/statements", params={"tenant": "plans-coder", "month": "last month"})
    assert bad.status_code == 400 and "YYYY-MM" in bad.json()["error"]["message"]
