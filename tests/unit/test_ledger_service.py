"""The ledger deployment's admission (LedgerService without Ray: the class is plain until
app.py binds it): the 429 names the model's category where no package covers it, and a
subscriber whose month turned since the last renewal round is renewed and admitted at once."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from factory.metering.ledger import Ledger
from factory.metering.service import LedgerService


def _service(target: str) -> LedgerService:
    return LedgerService(target, reservation_ttl_s=60, commit_interval_ms=1, timezone="Asia/Shanghai")


def test_admission_names_the_category_no_package_covers(target):
    with Ledger(target) as led:
        led.create_tenant("acme")
        led.grant_package("acme", 1_000, category="coding")
        _, key = led.create_key("acme")

    async def scenario():
        svc = _service(target)
        refused = await svc.admit(key, "r1", 10, "general")
        served = await svc.admit(key, "r2", 10, "coding")
        short = await svc.admit(key, "r3", 5_000, "coding")
        return refused, served, short

    refused, served, short = asyncio.run(scenario())
    assert (refused["status"], refused["code"]) == (429, "insufficient_quota")
    assert "category 'general'" in refused["message"] and "they cover coding" in refused["message"]
    assert served["ok"] and served["tenant"] == "acme"
    assert short["status"] == 429 and "has 990 left for category 'coding'" in short["message"]


def test_a_subscriber_whose_month_just_turned_is_renewed_and_admitted(target):
    async def scenario():
        svc = _service(target)  # its start-up renewal round has run: the subscription comes after it
        with Ledger(target) as led:
            led.create_tenant("acme")
            _, key = led.create_key("acme")
            led.create_plan("monthly", "monthly", 100)
            # Bought last month: its package has expired, and no round has renewed it yet.
            led.buy("acme", "monthly", now=datetime.now(timezone.utc) - timedelta(days=40), tz="Asia/Shanghai")
            assert led.balance("acme")["available"] == 0
        answer = await svc.admit(key, "r1", 60, "general")
        with Ledger(target) as led:
            return answer, [(p.tokens_total, p.tokens_reserved) for p in led.list_packages("acme", live_only=True)]

    answer, live = asyncio.run(scenario())
    assert answer["ok"], answer
    assert live == [(100, 60)]
