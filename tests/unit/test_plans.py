"""Plans and categories on both ledger backends: the catalogue, packs, trials (once per tenant,
spent first), monthly subscriptions renewing by calendar month in the operator's time zone (with
and without rollover, cancelled, raced, with requests in flight), and packages limited to a model
category."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from factory.metering.ledger import Ledger, LedgerError, QuotaExceeded, month_start, next_month
from tests.unit.test_ledger import run_threads, settle

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2030-11-20 10:00 in Shanghai; its month ends at 2030-12-01 00:00 +08:00 = 2030-11-30 16:00 UTC.
BOUGHT = datetime(2030, 11, 20, 10, tzinfo=SHANGHAI)
MONTH_END_UTC = datetime(2030, 11, 30, 16, tzinfo=timezone.utc)


def test_a_month_is_a_calendar_month_in_the_operators_zone():
    assert month_start(MONTH_END_UTC - timedelta(microseconds=1), SHANGHAI) == datetime(2030, 11, 1, tzinfo=SHANGHAI)
    assert month_start(MONTH_END_UTC, SHANGHAI) == datetime(2030, 12, 1, tzinfo=SHANGHAI)
    assert next_month(datetime(2030, 12, 1, tzinfo=SHANGHAI)) == datetime(2031, 1, 1, tzinfo=SHANGHAI)
    # A zone with summer time: the month starts at local midnight whatever the offset.
    berlin = ZoneInfo("Europe/Berlin")
    assert next_month(datetime(2030, 3, 1, tzinfo=berlin)).utcoffset() == timedelta(hours=2)


def test_the_catalogue_refuses_plans_that_cannot_be_sold(ledger):
    pack = ledger.create_plan("yuan-pack", "pack", 400_000, price=Decimal("1"), currency="CNY", valid_days=30)
    assert (pack.kind, pack.tokens, pack.price, pack.valid_days, pack.category) == ("pack", 400_000, 1, 30, None)
    for bad, match in [
        (dict(name="t", kind="trial", tokens=10), "trial needs valid_days"),
        (dict(name="p", kind="pack", tokens=10, rollover=True), "rollover applies to monthly"),
        (dict(name="m", kind="monthly", tokens=10, valid_days=30), "calendar month"),
        (dict(name="x", kind="weekly", tokens=10), "kind must be one of"),
        (dict(name="y", kind="pack", tokens=0), "tokens must be"),
        (dict(name="z", kind="pack", tokens=10, category="no spaces"), "bad category"),
        (dict(name="yuan-pack", kind="pack", tokens=10), "already exists"),
    ]:
        with pytest.raises(LedgerError, match=match):
            ledger.create_plan(**bad)
    ledger.create_tenant("acme")
    ledger.retire_plan("yuan-pack")
    assert ledger.list_plans() == [] and len(ledger.list_plans(include_retired=True)) == 1
    with pytest.raises(LedgerError, match="no longer sold"):
        ledger.buy("acme", "yuan-pack")
    with pytest.raises(LedgerError, match="unknown plan"):
        ledger.buy("acme", "nothing")


def test_a_category_limits_what_a_package_pays_for_and_the_refusal_names_it(ledger):
    ledger.create_plan("coder", "pack", 100, category="coding")
    ledger.create_tenant("acme")
    pkg = ledger.buy("acme", "coder")
    assert (pkg.kind, pkg.category, pkg.plan, pkg.expires_at) == ("pack", "coding", "coder", None)
    ledger.reserve("c1", "acme", 60, ttl_s=60, category="coding")
    with pytest.raises(QuotaExceeded) as refused:
        ledger.reserve("g1", "acme", 1, ttl_s=60, category="general")
    assert (refused.value.available, refused.value.category) == (0, "general")
    assert "for category 'general'" in str(refused.value)
    assert ledger.categories("acme") == {"coding"}
    # An all-models grant covers every category; the coding pack is still what coding spends first
    # (it expires no sooner, and is older).
    ledger.grant_package("acme", 50)
    ledger.reserve("g2", "acme", 50, ttl_s=60, category="general")
    assert ledger.categories("acme") == {"coding", None}
    # A settlement past its reservation takes the excess only from packages covering its category.
    settle(ledger, "c1", "acme", 30, 50, billed_tokens=80, category="coding")
    coding, anything = ledger.list_packages("acme")
    assert (coding.tokens_used, coding.tokens_reserved) == (80, 0)
    assert (anything.tokens_used, anything.tokens_reserved) == (0, 50)


def test_a_trial_is_spent_first_and_given_once(ledger):
    ledger.create_plan("try", "trial", 30, valid_days=7)
    ledger.create_tenant("acme")
    ledger.grant_package("acme", 100, expires_at=datetime.now(timezone.utc) + timedelta(days=1))  # expires sooner
    trial = ledger.buy("acme", "try")
    assert trial.kind == "trial" and trial.expires_at > datetime.now(timezone.utc) + timedelta(days=6)
    assert [p.kind for p in ledger.list_packages("acme")] == ["trial", "pack"]  # the spend order
    ledger.reserve("r1", "acme", 40, ttl_s=60)
    assert [(p.kind, p.tokens_reserved) for p in ledger.list_packages("acme")] == [("trial", 30), ("pack", 10)]
    with pytest.raises(LedgerError, match="already has its free trial"):
        ledger.buy("acme", "try")
    ledger.create_plan("try-again", "trial", 30, valid_days=7)
    with pytest.raises(LedgerError, match="already has its free trial"):  # one trial, whatever the plan
        ledger.buy("acme", "try-again")


def test_two_trials_bought_at_once_give_one(ledger):
    ledger.create_plan("try", "trial", 30, valid_days=7)
    ledger.create_tenant("acme")
    results: list = [None] * 8

    def buy(i: int) -> None:
        try:
            results[i] = ledger.buy("acme", "try").id
        except LedgerError as err:
            results[i] = str(err)

    run_threads(buy, 8)
    assert sum(isinstance(r, int) for r in results) == 1, results
    assert len(ledger.list_packages("acme")) == 1


def test_a_subscription_renews_each_calendar_month_in_the_operators_zone(ledger):
    ledger.create_plan("monthly-9.9", "monthly", 1000, price=Decimal("9.9"), rollover=False, category="general")
    ledger.create_plan("monthly-roll", "monthly", 500, rollover=True, category="coding")
    ledger.create_tenant("acme")
    first = ledger.buy("acme", "monthly-9.9", now=BOUGHT, tz="Asia/Shanghai")
    rolling = ledger.buy("acme", "monthly-roll", now=BOUGHT, tz="Asia/Shanghai")
    assert first.kind == "monthly" and first.price == Decimal("9.9")
    assert first.period_start == datetime(2030, 11, 1, tzinfo=SHANGHAI)
    assert first.expires_at == first.renews_at == MONTH_END_UTC
    with pytest.raises(LedgerError, match="live subscription"):
        ledger.buy("acme", "monthly-9.9", now=BOUGHT, tz="Asia/Shanghai")
    # Spend some of each in November.
    ledger.reserve("nov", "acme", 300, ttl_s=60, now=BOUGHT, category="coding")
    settle(ledger, "nov", "acme", 100, 100, billed_tokens=200, finished_at=BOUGHT, category="coding")
    # A subscriber whose months are counted in UTC (another operator zone, kept with the subscription).
    ledger.create_tenant("london")
    utc_month = ledger.buy("london", "monthly-9.9", now=BOUGHT, tz="UTC")
    assert utc_month.expires_at == datetime(2030, 12, 1, tzinfo=timezone.utc)
    with pytest.raises(LedgerError, match="unknown time zone"):
        ledger.buy("london", "monthly-roll", tz="Mars/Olympus")
    assert ledger.renew(now=MONTH_END_UTC - timedelta(seconds=1)) == []  # still November in Shanghai
    created = ledger.renew(now=MONTH_END_UTC)
    assert {p.tenant for p in created} == {"acme"}  # still November in UTC
    assert [p.tenant for p in ledger.renew(now=datetime(2030, 12, 1, tzinfo=timezone.utc))] == ["london"]
    assert ledger.renew(now=MONTH_END_UTC + timedelta(hours=1)) == []  # once per month
    by_plan = {p.plan: p for p in created}
    december = datetime(2030, 12, 1, tzinfo=SHANGHAI)
    assert by_plan["monthly-9.9"].tokens_total == 1000 and by_plan["monthly-9.9"].rolled_in == 0
    # The coding month spent 200 of its 500 (a coding request spends only what covers coding): 300 roll over.
    assert (by_plan["monthly-roll"].tokens_total, by_plan["monthly-roll"].rolled_in) == (800, 300)
    assert all(p.period_start == december and p.expires_at == next_month(december) for p in created)
    # November's packages expired; December's are what a request spends.
    assert ledger.balance("acme", now=MONTH_END_UTC)["available"] == 1800
    ledger.cancel_subscription("acme", "monthly-roll")
    january = ledger.renew(now=datetime(2031, 1, 1, tzinfo=SHANGHAI))
    assert [p.plan for p in january] == ["monthly-9.9"]
    assert rolling.renews_at is not None
    assert all(p.renews_at is None for p in ledger.list_packages("acme") if p.plan == "monthly-roll")


def test_a_renewal_while_requests_are_in_flight_charges_each_to_one_month(ledger):
    """Admitted in November, settled in December: charged to November's package (which held its
    tokens), never split, and December's allowance is untouched by it."""
    ledger.create_plan("monthly", "monthly", 1000)
    ledger.create_tenant("acme")
    november = ledger.buy("acme", "monthly", now=BOUGHT, tz="Asia/Shanghai")
    late = MONTH_END_UTC - timedelta(seconds=2)
    for i in range(5):
        ledger.reserve(f"r{i}", "acme", 100, ttl_s=600, now=late)
    errors: list = []

    def worker(i: int) -> None:
        try:
            if i < 5:
                settle(ledger, f"r{i}", "acme", 20, 40, billed_tokens=60 + i,
                       finished_at=MONTH_END_UTC + timedelta(seconds=1))  # fmt: skip
            else:
                ledger.renew(now=MONTH_END_UTC + timedelta(seconds=i))
        except Exception as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    run_threads(worker, 8)  # five settlements and three racing renewals
    assert errors == []
    old, new = sorted(ledger.list_packages("acme"), key=lambda p: p.id)
    assert old.id == november.id
    assert (old.tokens_used, old.tokens_reserved) == (sum(60 + i for i in range(5)), 0)
    assert (new.tokens_total, new.tokens_used, new.tokens_reserved) == (1000, 0, 0)
    # After the boundary, a new request can only spend December.
    ledger.reserve("dec", "acme", 10, ttl_s=60, now=MONTH_END_UTC + timedelta(minutes=1))
    assert [p.tokens_reserved for p in sorted(ledger.list_packages("acme"), key=lambda p: p.id)] == [0, 10]


def test_renewals_from_many_processes_create_one_package_per_month(target):
    with Ledger(target) as led:
        led.create_plan("monthly", "monthly", 1000)
        for t in ("a", "b", "c"):
            led.create_tenant(t)
            led.buy(t, "monthly", now=BOUGHT, tz="Asia/Shanghai")
    barrier = threading.Barrier(6)
    made: list[int] = []

    def renew(_: int) -> None:
        with Ledger(target, pool_size=1) as led:  # each its own pool, as separate processes would be
            barrier.wait()
            made.append(len(led.renew(now=MONTH_END_UTC)))

    run_threads(renew, 6)
    assert sum(made) == 3
    with Ledger(target) as led:
        assert all(len(led.list_packages(t)) == 2 for t in ("a", "b", "c"))


def test_a_monthly_statement_ties_out_to_the_usage_rows(ledger):
    """November 2030 in Shanghai for one tenant: usage of two models in two categories (rows on
    both sides of the month's edges), a pack, a trial and a rollover month bought, the trial and
    the month expired; the JSON's and the CSV's totals are the usage rows' sums, exactly."""
    import csv
    import io
    import math

    from factory.metering.statement import to_csv

    tz = "Asia/Shanghai"
    nov = lambda day, hour=12: datetime(2030, 11, day, hour, tzinfo=SHANGHAI)  # noqa: E731
    ledger.create_plan("pack", "pack", 10_000, price=Decimal("1.00"))
    ledger.create_plan("try", "trial", 500, valid_days=10, category="general")
    ledger.create_plan("coder", "monthly", 2_000, price=Decimal("9.90"), rollover=True, category="coding")
    ledger.create_tenant("acme")
    ledger.create_tenant("other")
    ledger.buy("acme", "try", now=nov(2))  # expires 12 Nov
    ledger.buy("acme", "pack", now=nov(5))
    ledger.buy("acme", "coder", now=nov(20), tz=tz)
    ledger.buy("other", "pack", now=nov(5))
    rows = [  # (id, model, category, finished_at, prompt, cached, completion, billed, energy, cost)
        ("oct", "tiny", "general", datetime(2030, 10, 31, 23, 59, tzinfo=SHANGHAI), 5, 0, 5, 10, 0.3, "0.001"),
        ("g1", "tiny", "general", nov(3), 100, 20, 50, 133, 1.1, "0.0021"),
        ("g2", "tiny", "general", nov(15), 40, 0, 10, 50, 0.7, "0.0007"),
        ("c1", "coder-7b", "coding", nov(21), 300, 100, 200, 710, 12.345678901, "0.0300000001"),
        ("c2", "coder-7b", "coding", datetime(2030, 11, 30, 23, 59, 59, tzinfo=SHANGHAI), 10, 0, 10, 30, 0.1, "0.0001"),
        ("dec", "coder-7b", "coding", datetime(2030, 12, 1, tzinfo=SHANGHAI), 10, 0, 10, 30, 0.1, "0.0001"),
    ]
    for rid, model, category, at, prompt, cached, completion, billed, energy, cost in rows:
        inside = rid not in ("oct", "dec")  # the rows outside the month are recorded only (no package then)
        if inside:
            ledger.reserve(rid, "acme", billed, ttl_s=60, now=at, category=category)
        settle(ledger, rid, "acme", prompt, completion, cached_tokens=cached, billed_tokens=billed, model=model,
               category=category, energy_j=energy, cost=Decimal(cost), finished_at=at, reserved=inside)  # fmt: skip
    settle(ledger, "o1", "other", 1, 1, finished_at=nov(10), reserved=False)  # another tenant's: not on it
    ledger.renew(now=MONTH_END_UTC)  # December's coding month, with November's free tokens rolled in

    doc = ledger.statement("acme", "2030-11", tz=tz, now=datetime(2031, 1, 1, tzinfo=timezone.utc))
    start, end = datetime(2030, 11, 1, tzinfo=SHANGHAI), datetime(2030, 12, 1, tzinfo=SHANGHAI)
    assert (doc["from"], doc["until"]) == (start.isoformat(), end.isoformat())
    records = ledger.usage("acme", since=start, until=end)
    assert sorted(r.request_id for r in records) == ["c1", "c2", "g1", "g2"]
    [total] = doc["totals"]
    for key, field in [("prompt_tokens", "prompt_tokens"), ("cached_tokens", "cached_tokens"),
                       ("completion_tokens", "completion_tokens"), ("billed_tokens", "billed_tokens")]:  # fmt: skip
        assert total[key] == sum(getattr(r, field) for r in records)
    assert total["requests"] == 4 and total["cost"] == sum(r.cost for r in records) == Decimal("0.0329000001")
    assert total["energy_j"] == math.fsum(r.energy_j for r in records)
    assert [(u["model"], u["category"], u["requests"], u["billed_tokens"]) for u in doc["usage"]] == [
        ("coder-7b", "coding", 2, 740), ("tiny", "general", 2, 183)]  # fmt: skip
    assert sum(u["cost"] for u in doc["usage"]) == total["cost"]
    assert [(b["plan"], b["kind"], b["tokens"], b["price"]) for b in doc["bought"]] == [
        ("try", "trial", 500, None), ("pack", "pack", 10_000, Decimal("1.00")),
        ("coder", "monthly", 2_000, Decimal("9.90"))]  # fmt: skip
    expired = {e["plan"]: e for e in doc["expired"]}
    assert set(expired) == {"try", "coder"}  # the trial on the 12th, the month at its end
    # The trial paid for g1 (trial first; g2 came after it expired on the 12th): 367 unused, all lost.
    assert (expired["try"]["unused_tokens"], expired["try"]["expired_tokens"]) == (367, 367)
    # The coding month: 2,000 - 740 unused, rolled into December, none lost.
    assert (expired["coder"]["unused_tokens"], expired["coder"]["rolled_over_tokens"]) == (1_260, 1_260)
    assert expired["coder"]["expired_tokens"] == 0

    table = list(csv.DictReader(io.StringIO(to_csv(doc))))
    usage_rows = [r for r in table if r["section"] == "usage"]
    [total_row] = [r for r in table if r["section"] == "total"]
    assert sum(Decimal(r["cost"]) for r in usage_rows) == Decimal(total_row["cost"]) == total["cost"]
    assert sum(int(r["billed_tokens"]) for r in usage_rows) == int(total_row["billed_tokens"])
    assert float(total_row["energy_j"]) == total["energy_j"]  # every digit kept
    assert {r["section"] for r in table} == {"usage", "total", "bought", "expired"}
    with pytest.raises(LedgerError, match="YYYY-MM"):
        ledger.statement("acme", "2030-13")
