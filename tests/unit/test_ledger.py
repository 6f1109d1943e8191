"""The ledger on both of its backends, a real SQLite file and a real PostgreSQL server (every test
runs on each): keys are stored only as hashes, reservations never overspend a package (even with
many processes racing), settlement charges exactly what was used."""

from __future__ import annotations

import multiprocessing
import random
import re
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from factory.metering.ledger import (
    PRIORITY_CLASSES,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    QuotaExceeded,
    UnknownTenant,
    default_ledger,
)
from factory.metering.rates import Rates
from factory.metering.schema import MIGRATIONS, SCHEMA_VERSION

# A year ahead, so packages expiring around it can still be granted whenever the tests run.
T0 = (datetime.now(timezone.utc) + timedelta(days=365)).replace(microsecond=0)


def raw_engine(ledger: Ledger) -> sa.Engine:
    """A connection of our own to the ledger's database, past the Ledger's code."""
    return sa.create_engine(ledger.url, poolclass=sa.pool.NullPool)


def stored_text(ledger: Ledger) -> str:
    """Every row of every table, as text."""
    engine = raw_engine(ledger)
    with engine.connect() as conn:
        tables = sa.inspect(conn).get_table_names()
        rows = [conn.execute(sa.text(f"SELECT * FROM {t}")).fetchall() for t in tables]
    engine.dispose()
    return repr(rows)


def settle(ledger: Ledger, request_id: str, tenant: str, prompt: int, completion: int, **overrides):
    fields = dict(tenant=tenant, prompt_tokens=prompt, completion_tokens=completion, energy_j=1.25,
                  energy_source="nvml", cost=Decimal("0.01"), currency="CNY", model="tiny")  # fmt: skip
    return ledger.settle(request_id, **(fields | overrides))


def packages(ledger: Ledger, tenant: str) -> dict[int, tuple[int, int]]:
    """package id -> (used, reserved)"""
    return {p.id: (p.tokens_used, p.tokens_reserved) for p in ledger.list_packages(tenant)}


def run_threads(worker, n: int) -> None:
    """worker(0) ... worker(n - 1), each in its own thread, all at once; returns when all are done."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- storage ------------------------------------------------------------------------------


def test_new_sqlite_ledger_is_wal_and_default_location_follows_env(tmp_path, monkeypatch):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()

    monkeypatch.delenv("FACTORY_LEDGER", raising=False)
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    assert default_ledger() == str(tmp_path / "home" / "ledger.db")
    monkeypatch.setenv("FACTORY_LEDGER", str(tmp_path / "elsewhere.db"))
    assert default_ledger() == str(tmp_path / "elsewhere.db")
    monkeypatch.setenv("FACTORY_LEDGER", "postgresql://billing@db.example:5432/ledger")
    assert default_ledger() == "postgresql://billing@db.example:5432/ledger"


def test_schema_is_versioned_and_migrated_once_by_racing_openers(target):
    """Ten processes' worth of openers at once on a new database: one creates the schema, the
    others wait for it; the version is recorded once; a newer schema than ours is refused."""
    errors = []

    def open_close() -> None:
        try:
            Ledger(target).close()
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=open_close) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Ledger(target) as ledger:
        engine = raw_engine(ledger)
        with engine.begin() as conn:
            versions = conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version")).fetchall()
            assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
            tables = set(sa.inspect(conn).get_table_names())
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": SCHEMA_VERSION + 1})
        engine.dispose()
    assert tables == {"schema_version", "tenants", "api_keys", "packages", "reservations", "reservation_parts",
                      "usage", "plans", "subscriptions"}  # fmt: skip
    with pytest.raises(LedgerError, match=f"schema v{SCHEMA_VERSION + 1}; this factory knows v{SCHEMA_VERSION}"):
        Ledger(target)


def test_database_itself_refuses_an_overspend(ledger):
    ledger.create_tenant("a")
    package = ledger.grant_package("a", 10)
    engine = raw_engine(ledger)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        overspend = sa.text("UPDATE packages SET tokens_used = 8, tokens_reserved = 3 WHERE id = :id")
        conn.execute(overspend, {"id": package.id})
    engine.dispose()
    assert ledger.balance("a") == {"total": 10, "used": 0, "reserved": 0, "available": 10}


# -- tenants ------------------------------------------------------------------------------


def test_tenants_create_get_ensure_list_and_priority(ledger):
    assert PRIORITY_CLASSES == ("high", "standard", "low")
    a = ledger.create_tenant("acme.prod-1", "high")
    assert (a.name, a.priority, a.created_at.tzinfo) == ("acme.prod-1", "high", timezone.utc)
    assert ledger.get_tenant("acme.prod-1") == a
    assert ledger.get_tenant("nobody") is None
    with pytest.raises(LedgerError, match="already exists"):
        ledger.create_tenant("acme.prod-1")
    for bad in ("", "a b", "x" * 65, "é", "a/b"):
        with pytest.raises(LedgerError, match="bad tenant name"):
            ledger.create_tenant(bad)
    with pytest.raises(LedgerError, match="priority"):
        ledger.create_tenant("b", "urgent")
    anon = ledger.ensure_tenant("anonymous")
    assert ledger.ensure_tenant("anonymous") == anon
    assert ledger.set_priority("anonymous", "low").priority == "low"
    with pytest.raises(UnknownTenant):
        ledger.set_priority("nobody", "low")
    assert [t.name for t in ledger.list_tenants()] == ["acme.prod-1", "anonymous"]


# -- keys ---------------------------------------------------------------------------------


def test_key_lifecycle_stores_only_a_hash(target, ledger):
    ledger.create_tenant("acme")
    info, token = ledger.create_key("acme", label="ci")
    match = re.fullmatch(r"tf-([0-9a-f]{12})-([A-Za-z0-9_-]{43})", token)
    assert match and match[1] == info.key_id
    secret = match[2]
    assert (info.tenant, info.admin, info.label, info.revoked_at) == ("acme", False, "ci", None)

    stored = stored_text(ledger)
    assert info.key_id in stored  # the scan sees the key's row...
    assert secret not in stored  # ...but never its secret
    if ledger.backend == "sqlite":  # and no page of the file (the WAL may hold the newest) has it either
        path = Path(target)
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert info.key_id.encode() in raw and secret.encode() not in raw

    assert ledger.verify_key(token) == info
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert ledger.verify_key(wrong) is None
    unknown = f"tf-{'1' if info.key_id[0] == '0' else '0'}{info.key_id[1:]}-{secret}"
    assert ledger.verify_key(unknown) is None
    for malformed in ("", "Bearer " + token, token[3:], token + " ", "tf-XYZ-" + secret, "tf--" + secret, None):
        assert ledger.verify_key(malformed) is None

    assert ledger.revoke_key(info.key_id) is True
    assert ledger.verify_key(token) is None
    assert ledger.revoke_key(info.key_id) is False
    assert ledger.revoke_key("0123456789ab") is False
    [listed] = ledger.list_keys("acme")
    assert listed.revoked_at is not None


def test_admin_and_tenant_keys_are_kept_apart(ledger):
    ledger.create_tenant("a")
    ledger.create_tenant("b")
    admin, admin_token = ledger.create_key(None, admin=True)
    key_a, token_a = ledger.create_key("a")
    ledger.create_key("b")
    assert (admin.tenant, admin.admin) == (None, True)
    assert ledger.verify_key(admin_token).admin is True
    assert ledger.verify_key(token_a).tenant == "a"
    with pytest.raises(LedgerError):
        ledger.create_key("a", admin=True)
    with pytest.raises(LedgerError):
        ledger.create_key(None)
    with pytest.raises(UnknownTenant):
        ledger.create_key("nobody")
    assert [k.key_id for k in ledger.list_keys("a")] == [key_a.key_id]
    assert len(ledger.list_keys()) == 3


# -- reservations -------------------------------------------------------------------------


def test_racing_ledgers_never_overspend_a_package(target, ledger):
    """200 Ledger instances (one connection each, as separate processes would have) reserve 10
    tokens each against 500: exactly 50 win; settling them charges exactly what they used."""
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 500)
    n = 200
    won, lost, failures, charged = [], [], [], []
    mid_race = {}
    start = threading.Barrier(n, timeout=30)
    reserved_all = threading.Barrier(n, timeout=30, action=lambda: mid_race.update(packages(ledger, "acme")))

    def worker(i: int) -> None:
        led = None
        try:
            led = Ledger(target, pool_size=1)
            start.wait()
            try:
                led.reserve(f"r{i}", "acme", 10, ttl_s=60)
                won.append(i)
            except QuotaExceeded as err:
                lost.append(err.available)
            reserved_all.wait()
            if i in won:
                actual = random.Random(i).randint(0, 10)
                prompt = random.Random(-i).randint(0, actual)
                settle(led, f"r{i}", "acme", prompt, actual - prompt)
                charged.append(actual)
        except Exception as err:
            failures.append(err)
            start.abort()  # let the other threads fail fast instead of waiting out the barrier
            reserved_all.abort()
        finally:
            if led is not None:
                led.close()

    run_threads(worker, n)
    assert [f for f in failures if not isinstance(f, threading.BrokenBarrierError)] == []
    assert (len(won), len(lost)) == (50, 150)
    assert set(lost) == {0}
    assert mid_race == {package.id: (0, 500)}
    assert packages(ledger, "acme") == {package.id: (sum(charged), 0)}
    assert ledger.balance("acme")["available"] == 500 - sum(charged) >= 0
    assert len(ledger.usage("acme")) == 50


def _race_in_process(target: str, first: int, n: int, start, reserved_all, results) -> None:
    """One of the racing processes: `n` threads, one Ledger (its pool), each thread reserves 10
    tokens once the whole field is ready; once every thread of every process has tried, the
    winners settle a random actual use (settling earlier would free tokens for later racers)."""
    led = Ledger(target)
    outcomes = []

    def one(i: int) -> None:
        try:
            led.reserve(f"p{i}", "acme", 10, ttl_s=60)
        except QuotaExceeded:
            outcomes.append((i, "lost", 0))
            reserved_all.wait()
            return
        except Exception as err:  # noqa: BLE001 - reported to the test
            outcomes.append((i, f"error: {err!r}", 0))
            reserved_all.abort()
            return
        reserved_all.wait()
        actual = random.Random(i).randint(0, 10)
        settle(led, f"p{i}", "acme", actual // 2, actual - actual // 2)
        outcomes.append((i, "won", actual))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(first, first + n)]
    start.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led.close()
    results.put(outcomes)


def test_four_processes_racing_200_requests_against_a_package_for_50(target, ledger):
    """The race as the factory's nodes would run it: 4 OS processes, 50 concurrent requests each,
    10 tokens apiece against a package of 500: exactly 50 win, and the package ends charged with
    exactly what the winners used, nothing left reserved."""
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 500)
    ctx = multiprocessing.get_context("spawn")
    start, reserved_all, results = ctx.Barrier(4, timeout=120), ctx.Barrier(200, timeout=120), ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(target, 50 * k, 50, start, reserved_all, results)) for k in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [o for _ in procs for o in results.get(timeout=180)]
    for p in procs:
        p.join(30)
    assert [o for o in outcomes if o[1] not in ("won", "lost")] == []
    won = [o for o in outcomes if o[1] == "won"]
    assert (len(outcomes), len(won)) == (200, 50)
    charged = sum(actual for _, _, actual in won)
    assert packages(ledger, "acme") == {package.id: (charged, 0)}
    assert len(ledger.usage("acme")) == 50


def test_one_ledger_shared_by_threads_is_safe(ledger):
    ledger.create_tenant("acme")
    ledger.grant_package("acme", 100)
    results = []

    def worker(i: int) -> None:
        try:
            ledger.reserve(f"r{i}", "acme", 3, ttl_s=60)
            results.append(True)
        except QuotaExceeded:
            results.append(False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 33
    assert ledger.balance("acme") == {"total": 100, "used": 0, "reserved": 99, "available": 1}


def test_reservation_spans_packages_soonest_expiry_first(ledger):
    ledger.create_tenant("acme")
    later = ledger.grant_package("acme", 100, expires_at=T0 + timedelta(days=2))
    never = ledger.grant_package("acme", 100)
    sooner = ledger.grant_package("acme", 100, expires_at=T0 + timedelta(days=1))
    assert [p.id for p in ledger.list_packages("acme")] == [sooner.id, later.id, never.id]

    ledger.reserve("r1", "acme", 150, ttl_s=60, now=T0)
    assert packages(ledger, "acme") == {sooner.id: (0, 100), later.id: (0, 50), never.id: (0, 0)}
    settle(ledger, "r1", "acme", 20, 100, finished_at=T0)  # 120 of 150: charged in the order taken
    assert packages(ledger, "acme") == {sooner.id: (100, 0), later.id: (20, 0), never.id: (0, 0)}

    ledger.reserve("r2", "acme", 130, ttl_s=60, now=T0)  # the rest of `later`, then the never-expiring one
    assert packages(ledger, "acme") == {sooner.id: (100, 0), later.id: (20, 80), never.id: (0, 50)}
    with pytest.raises(QuotaExceeded) as exc:
        ledger.reserve("r3", "acme", 51, ttl_s=60, now=T0)
    assert (exc.value.available, exc.value.requested) == (50, 51)


def test_expired_packages_cannot_be_spent(ledger):
    ledger.create_tenant("acme")
    ledger.grant_package("acme", 100, expires_at=T0)
    ledger.grant_package("acme", 50)
    after = T0 + timedelta(seconds=1)
    assert ledger.balance("acme", now=T0 - timedelta(seconds=1))["available"] == 150
    assert ledger.balance("acme", now=after) == {"total": 50, "used": 0, "reserved": 0, "available": 50}
    with pytest.raises(QuotaExceeded) as exc:
        ledger.reserve("r1", "acme", 60, ttl_s=60, now=after)
    assert exc.value.available == 50
    with pytest.raises(LedgerError, match="already past"):
        ledger.grant_package("acme", 10, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))


def test_release_and_release_expired_hand_tokens_back(ledger):
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 100)
    ledger.reserve("short", "acme", 10, ttl_s=10, now=T0)
    ledger.reserve("long", "acme", 20, ttl_s=1000, now=T0)
    ledger.reserve("gone", "acme", 30, ttl_s=1000, now=T0)
    assert ledger.release("gone") is True
    assert ledger.release("gone") is False
    assert ledger.release_expired(now=T0 + timedelta(seconds=9)) == 0
    assert ledger.release_expired(now=T0 + timedelta(seconds=60)) == 1
    assert packages(ledger, "acme") == {package.id: (0, 20)}
    assert ledger.release("short") is False
    assert ledger.release("long") is True
    assert packages(ledger, "acme") == {package.id: (0, 0)}


def test_request_id_is_reserved_at_most_once(ledger):
    ledger.create_tenant("acme")
    ledger.grant_package("acme", 100)
    ledger.reserve("r1", "acme", 10, ttl_s=60)
    with pytest.raises(LedgerError, match="already"):
        ledger.reserve("r1", "acme", 10, ttl_s=60)
    settle(ledger, "r1", "acme", 1, 1)
    with pytest.raises(LedgerError, match="already"):
        ledger.reserve("r1", "acme", 10, ttl_s=60)
    with pytest.raises(UnknownTenant):
        ledger.reserve("r2", "nobody", 1, ttl_s=60)
    for bad in (dict(tokens=-1, ttl_s=60), dict(tokens=1, ttl_s=0), dict(tokens=1.5, ttl_s=60)):
        with pytest.raises(LedgerError):
            ledger.reserve("r3", "acme", **bad)


# -- settlement ---------------------------------------------------------------------------


def test_settle_is_idempotent(ledger):
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 100)
    ledger.reserve("r1", "acme", 50, ttl_s=60)
    first = settle(ledger, "r1", "acme", 10, 20)
    again = settle(ledger, "r1", "acme", 40, 40, cost=Decimal("9"))
    assert again == first
    assert packages(ledger, "acme") == {package.id: (30, 0)}


def test_settle_beyond_the_reservation_charges_other_packages_then_records_overage(ledger):
    ledger.create_tenant("acme")
    first = ledger.grant_package("acme", 100, expires_at=T0)
    second = ledger.grant_package("acme", 30)
    ledger.reserve("r1", "acme", 50, ttl_s=60, now=T0 - timedelta(hours=1))
    record = settle(ledger, "r1", "acme", 50, 150, finished_at=T0 - timedelta(minutes=1))
    assert record.overage_tokens == 70  # 200 used: 50 reserved + 50 left in first + 30 in second
    assert packages(ledger, "acme") == {first.id: (100, 0), second.id: (30, 0)}

    ledger.grant_package("acme", 10)  # a reservation covers the request: no overage, rest released
    ledger.reserve("r2", "acme", 10, ttl_s=60)
    assert settle(ledger, "r2", "acme", 2, 3).overage_tokens == 0
    assert ledger.balance("acme")["available"] == 5


def test_settle_without_reservation_only_records_and_creates_the_tenant(ledger):
    record = settle(ledger, "r1", "anonymous", 3, 4, status="aborted", replica="replica-0")
    assert (record.tenant, record.prompt_tokens, record.completion_tokens, record.overage_tokens) == (
        "anonymous", 3, 4, 0)  # fmt: skip
    assert (record.status, record.replica, record.energy_j, record.energy_source) == (
        "aborted", "replica-0", 1.25, "nvml")  # fmt: skip
    assert ledger.get_tenant("anonymous").priority == "standard"


def test_settle_after_the_reservation_expired_still_charges_what_was_served(ledger):
    """A request that outlived its reservation (released as expired) is charged at settlement
    from what the tenant has left, the rest recorded as overage; served is paid for."""
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 10)
    ledger.reserve("slow", "acme", 8, ttl_s=1, now=T0 - timedelta(days=400))
    assert ledger.release_expired() == 1
    record = settle(ledger, "slow", "acme", 4, 9, reserved=True)
    assert (record.prompt_tokens, record.completion_tokens, record.overage_tokens) == (4, 9, 3)
    assert packages(ledger, "acme") == {package.id: (10, 0)}
    assert settle(ledger, "slow", "acme", 4, 9, reserved=True) == record  # idempotent, as ever


def test_settle_refuses_bad_fields_and_another_tenants_reservation(ledger):
    ledger.create_tenant("a")
    ledger.create_tenant("b")
    ledger.grant_package("a", 100)
    ledger.reserve("r1", "a", 10, ttl_s=60)
    with pytest.raises(LedgerError, match="reserved for 'a'"):
        settle(ledger, "r1", "b", 1, 1)
    for bad in (dict(status="done"), dict(cost=0.01), dict(currency="yuan"), dict(energy_j=float("nan")),
                dict(started_at=datetime(2031, 1, 1))):  # fmt: skip
        with pytest.raises(LedgerError):
            settle(ledger, "r1", "a", 1, 1, **bad)
    assert ledger.balance("a")["reserved"] == 10  # refused settlements changed nothing


def test_settle_many_is_one_transaction(ledger):
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 100)
    for i in range(3):
        ledger.reserve(f"r{i}", "acme", 10, ttl_s=60)
    batch = [
        dict(request_id=f"r{i}", tenant="acme", prompt_tokens=2, completion_tokens=3, energy_j=0.5,
             energy_source="nvml", cost=Decimal("0.1"), currency="CNY", model="tiny")
        for i in range(3)
    ]  # fmt: skip
    with pytest.raises(LedgerError, match="status"):
        ledger.settle_many(batch[:2] + [batch[2] | {"status": "lost"}])
    assert ledger.usage() == []  # the good two were rolled back with the bad one
    assert packages(ledger, "acme") == {package.id: (0, 30)}
    ledger.create_tenant("other")
    with pytest.raises(LedgerError, match="reserved for 'acme'"):  # refused by the database, mid-batch
        ledger.settle_many(batch[:2] + [batch[2] | {"tenant": "other"}])
    assert ledger.usage() == []
    assert packages(ledger, "acme") == {package.id: (0, 30)}

    records = ledger.settle_many(batch)
    assert [r.request_id for r in records] == ["r0", "r1", "r2"]
    assert packages(ledger, "acme") == {package.id: (15, 0)}
    [total] = ledger.usage_summary("acme")
    assert total["cost"] == Decimal("0.3")  # exact: 0.1 + 0.1 + 0.1 in floats is not 0.3


def test_both_backends_keep_one_ledger_through_a_random_history(tmp_path, pg_url):
    """PostgreSQL spends packages in its own functions (procedures.py), SQLite in settlement.py:
    one seeded history of 400 reserves (some over quota, some duplicates), settlements (under,
    at and over what was reserved; late, after the reservation expired; never reserved), releases
    and expiries, played on both, must leave every package, reservation and usage row the same."""
    rng = random.Random(20261207)
    history = []
    for step in range(400):
        tenant = rng.choice(["a", "b", "c"])
        rid = f"r{rng.randrange(120)}"  # ids repeat: duplicates and retried settlements happen
        history.append((rng.choice(["reserve", "reserve", "settle", "settle", "late", "free", "release", "expire"]),
                        tenant, rid, rng.randint(0, 60), rng.randint(0, 40), step,
                        rng.choice([None, "general", "coding"])))  # fmt: skip

    def play(target: str) -> tuple:
        outcomes = []
        with Ledger(target) as led:
            led.create_plan("try-it", "trial", 40, valid_days=1)
            for tenant in "abc":
                led.create_tenant(tenant)
                # An all-models pack, a general one, a coding one and a trial, spent trial first.
                for k, (expires, category) in enumerate([(T0 + timedelta(hours=1), None), (None, "general"),
                                                         (T0 + timedelta(minutes=30), "coding")]):  # fmt: skip
                    led.grant_package(tenant, 150 + 50 * k, expires_at=expires, category=category)
                if tenant != "c":
                    led.buy(tenant, "try-it", now=T0 - timedelta(hours=3))
            for op, tenant, rid, a, b, step, category in history:
                now = T0 - timedelta(hours=2) + timedelta(minutes=step)  # ~7 h: packages expire on the way
                try:
                    if op == "reserve":
                        led.reserve(rid, tenant, a, ttl_s=rng_ttl(step), now=now, category=category)
                    elif op in ("settle", "late", "free"):
                        # Billed in factory tokens at 1 / 0.5 / 2 (cached: a quarter of the prompt).
                        billed = (a // 2 - a // 4) + (a // 4 + 1) // 2 + 2 * b
                        settle(led, rid, tenant, a // 2, b, finished_at=now, reserved=op != "free",
                               cached_tokens=a // 4, billed_tokens=billed, category=category)  # fmt: skip
                    elif op == "release":
                        outcomes.append(led.release(rid))
                    else:
                        outcomes.append(led.release_expired(now=now))
                    outcomes.append(op)
                except LedgerError as err:
                    outcomes.append(type(err).__name__)
            state = [(p.tenant, p.kind, p.category, p.tokens_total, p.tokens_used, p.tokens_reserved) for t in "abc"
                     for p in led.list_packages(t)]  # fmt: skip
            usage = sorted((u.request_id, u.tenant, u.category, u.prompt_tokens, u.completion_tokens, u.cached_tokens,
                            u.billed_tokens, u.overage_tokens) for u in led.usage())  # fmt: skip
            return outcomes, state, usage, [led.balance(t) for t in "abc"]

    def rng_ttl(step: int) -> float:
        return 60.0 * (1 + step % 7)  # some outlive the history, some expire within it

    sqlite_run, postgres_run = play(str(tmp_path / "ledger.db")), play(pg_url)
    assert sqlite_run == postgres_run
    outcomes, state, usage, _ = sqlite_run
    # The history exercised what it claims to: refusals, duplicates, overage, every kind spent.
    assert {"QuotaExceeded", "LedgerError", "reserve", "settle"} <= set(outcomes)
    assert any(overage > 0 for *_, overage in usage)
    assert all(used > 0 for _, kind, _, _, used, _ in state), state


def test_postgresql_restart_costs_no_call_a_dead_connection(postgres, pg_url):
    """A server restart leaves the pool's connections dead; the next reserve, settlement and read
    must each get a live one (the checkout's look, store._still_connected), not an error."""
    with Ledger(pg_url, pool_size=2) as led:
        led.create_tenant("acme")
        led.grant_package("acme", 100)
        led.reserve("before", "acme", 10, ttl_s=60)  # a pooled connection, about to die
        postgres.pg_ctl("restart")
        led.reserve("after", "acme", 10, ttl_s=60)
        settle(led, "before", "acme", 3, 4, reserved=True)
        assert led.balance("acme") == {"total": 100, "used": 7, "reserved": 10, "available": 83}


def test_postgresql_down_makes_every_call_ledger_unavailable(postgres, pg_url):
    """With the server stopped, reservations, settlements (one or a batch) and reads all raise
    LedgerUnavailable (the ledger service answers 503 for it and holds settlements until the
    server is back; any other error would drop a settlement): the pool's connections died and no
    new one can be opened. Once it is back, they go through."""
    with Ledger(pg_url, pool_size=2) as led:
        led.create_tenant("acme")
        led.grant_package("acme", 100)
        led.reserve("held", "acme", 10, ttl_s=60)
        batch = [dict(request_id="held", tenant="acme", prompt_tokens=2, completion_tokens=3, energy_j=0.5,
                      energy_source="nvml", cost=Decimal("0.1"), currency="CNY", model="t", reserved=True)]  # fmt: skip
        postgres.pg_ctl("stop")
        try:
            calls = [
                lambda: led.reserve("new", "acme", 10, ttl_s=60),
                lambda: settle(led, "held", "acme", 2, 3, reserved=True),
                lambda: led.settle_many(batch),
                lambda: led.balance("acme"),
            ]
            for call in calls:
                with pytest.raises(LedgerUnavailable):
                    call()
        finally:
            postgres.pg_ctl("start")
        assert [r.billed_tokens for r in led.settle_many(batch)] == [5]
        assert led.balance("acme") == {"total": 100, "used": 5, "reserved": 0, "available": 95}


# -- usage --------------------------------------------------------------------------------


def test_usage_is_isolated_per_tenant_and_filtered_by_time(ledger):
    for i, (tenant, minute) in enumerate([("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4)]):
        finished_at = T0 + timedelta(minutes=minute)
        settle(ledger, f"r{i}", tenant, 1, 2, cost=Decimal("0.000000000001"), finished_at=finished_at)
    a_rows = ledger.usage(tenant="a")
    assert [r.request_id for r in a_rows] == ["r4", "r2", "r0"]  # newest first
    assert {r.tenant for r in a_rows} == {"a"}
    assert {r.tenant for r in ledger.usage(tenant="b")} == {"b"}
    assert [r.request_id for r in ledger.usage(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))] == [
        "r2", "r1"]  # fmt: skip
    assert [r.request_id for r in ledger.usage(limit=2)] == ["r4", "r3"]
    assert a_rows[0].cost == Decimal("0.000000000001") and a_rows[0].finished_at == T0 + timedelta(minutes=4)
    with pytest.raises(UnknownTenant):
        ledger.usage(tenant="nobody")

    summary = {s["tenant"]: s for s in ledger.usage_summary()}
    assert summary["a"] == dict(tenant="a", requests=3, prompt_tokens=3, completion_tokens=6, cached_tokens=0,
                                billed_tokens=9, energy_j=3.75, cost=Decimal("0.000000000003"),
                                currency="CNY")  # fmt: skip
    assert summary["b"]["requests"] == 2
    assert [s["tenant"] for s in ledger.usage_summary(tenant="b")] == ["b"]
    assert ledger.usage_summary(since=T0 + timedelta(minutes=4))[0]["requests"] == 1


# -- one token unit (metering/rates.py) ----------------------------------------------------


def test_settle_charges_the_billed_factory_tokens_and_keeps_the_raw_counts(ledger):
    rates = Rates(input=Decimal("0.5"), cached_input=Decimal("0.05"), output=Decimal("2.5"))
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 1_000)
    worst = rates.worst(prompt_tokens=40, max_output_tokens=30)  # 20 + 75
    assert worst == 95
    ledger.reserve("r1", "acme", worst, ttl_s=60)
    billed = rates.billed(prompt_tokens=40, cached_tokens=32, completion_tokens=7)  # 4 + 1.6 + 17.5 -> 24
    assert billed == 24
    record = settle(ledger, "r1", "acme", 40, 7, cached_tokens=32, billed_tokens=billed)
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens, record.billed_tokens) == (
        40,
        7,
        32,
        24,
    )
    assert packages(ledger, "acme") == {package.id: (24, 0)}
    # Without rates the raw count is billed, as before there were rates.
    ledger.reserve("r2", "acme", 50, ttl_s=60)
    assert settle(ledger, "r2", "acme", 10, 5).billed_tokens == 15
    assert packages(ledger, "acme") == {package.id: (39, 0)}
    with pytest.raises(LedgerError, match="cached_tokens"):
        settle(ledger, "r3", "acme", 10, 5, cached_tokens=11)


def test_two_models_at_different_rates_race_for_a_package_of_fifty_requests(target, ledger):
    """200 requests at once, half for a model billed 1 / 1 / 1 and half for one billed 0.5 / 2.5
    (each worst case 20 factory tokens), against 1,000 factory tokens: exactly 50 admitted; each
    charged its billed count, nothing else."""
    models = {"small": Rates(), "big": Rates(input=Decimal("0.5"), cached_input=Decimal("0.5"), output=Decimal("2.5"))}
    shapes = {"small": (8, 12), "big": (10, 6)}  # (prompt, max_tokens): 8 + 12 = 20, 5 + 15 = 20
    ledger.create_tenant("acme")
    package = ledger.grant_package("acme", 1_000)
    start, reserved_all = threading.Barrier(200, timeout=30), threading.Barrier(200, timeout=30)
    won, lost, failures, billed = [], [], [], []

    def worker(i: int) -> None:
        model = "big" if i % 2 else "small"
        prompt, max_tokens = shapes[model]
        try:
            start.wait()
            try:
                ledger.reserve(f"r{i}", "acme", models[model].worst(prompt, max_tokens), ttl_s=60)
                won.append(i)
            except QuotaExceeded:
                lost.append(i)
            reserved_all.wait()  # settling early would hand tokens back for a later reservation
            if i in won:
                completion = random.Random(i).randint(0, max_tokens)
                charge = models[model].billed(prompt, 0, completion)
                settle(ledger, f"r{i}", "acme", prompt, completion, billed_tokens=charge, model=model)
                billed.append(charge)
        except Exception as err:  # noqa: BLE001 - asserted below
            failures.append(err)
            start.abort()
            reserved_all.abort()

    run_threads(worker, 200)
    assert [f for f in failures if not isinstance(f, threading.BrokenBarrierError)] == []
    assert (len(won), len(lost)) == (50, 150)
    assert {i % 2 for i in won} == {0, 1}  # both models got in
    assert packages(ledger, "acme") == {package.id: (sum(billed), 0)}
    assert sum(u.billed_tokens for u in ledger.usage("acme")) == sum(billed)


def test_a_ledger_from_before_rates_migrates_its_usage_to_raw_billing(target):
    """A schema v2 ledger (no cached or billed counts) opened by this factory: its usage rows are
    billed their raw count, and settlement goes on charging factory tokens. (It passes through v3
    to v4: its package becomes a plain pack for every category.)"""
    with Ledger(target) as led:  # today's schema, taken down below and rebuilt at v2
        engine = raw_engine(led)
    with engine.begin() as conn:
        for table in ("usage", "reservation_parts", "reservations", "api_keys", "packages", "subscriptions", "plans",
                      "tenants"):  # fmt: skip
            conn.execute(sa.text(f"DROP TABLE {table}"))
        conn.execute(sa.text("DROP TABLE schema_version"))
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("DROP FUNCTION factory_settle(" + ", ".join(
                ["text", "text", "bigint", "bigint", "double precision"] + ["text"] * 8 + ["boolean", "text", "bigint",
                 "bigint", "text"]) + ")"))  # fmt: skip
            conn.execute(sa.text("DROP FUNCTION factory_reserve(text, text, bigint, text, text, text)"))
            conn.execute(sa.text("DROP FUNCTION factory_charge_available(integer, bigint, text, text)"))
        for version in (1, 2):
            MIGRATIONS[version](conn)
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": version})
        if conn.dialect.name == "postgresql":  # what an older factory left at v2: the raw-count settle
            conn.execute(sa.text(
                "CREATE FUNCTION factory_settle(text, text, bigint, bigint, double precision, text, text, text,"
                " text, text, text, text, text, boolean, text) RETURNS void LANGUAGE sql AS 'SELECT 1'"
            ))  # fmt: skip
        conn.execute(sa.text("INSERT INTO tenants (name, priority, created_at) VALUES ('old', 'standard', :t)"),
                     {"t": T0.isoformat()})  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO usage (request_id, tenant_id, model, replica, prompt_tokens, completion_tokens,"
            " overage_tokens, energy_j, energy_source, cost, currency, status, finished_at)"
            " SELECT 'before', id, 'm', '', 3, 4, 0, 1.0, 'modeled', '0.1', 'CNY', 'completed', :t FROM tenants"
        ), {"t": T0.isoformat()})  # fmt: skip
        conn.execute(sa.text("INSERT INTO packages (tenant_id, tokens_total, tokens_used, tokens_reserved, currency,"
                             " created_at) SELECT id, 100, 0, 0, 'CNY', :t FROM tenants"),
                     {"t": T0.isoformat()})  # fmt: skip
    engine.dispose()
    with Ledger(target) as led:
        [old] = led.usage("old")
        assert (old.prompt_tokens, old.completion_tokens, old.cached_tokens, old.billed_tokens) == (3, 4, 0, 7)
        [pkg] = led.list_packages("old")
        assert (pkg.kind, pkg.category, pkg.plan, pkg.rolled_in) == ("pack", None, None, 0)
        led.reserve("after", "old", 30, ttl_s=60, category="coding")
        assert settle(led, "after", "old", 10, 10, cached_tokens=4, billed_tokens=13).billed_tokens == 13
        assert led.balance("old")["used"] == 13
    if raw_engine(led).dialect.name == "postgresql":
        with raw_engine(led).connect() as conn:
            arities = conn.execute(sa.text("SELECT pronargs FROM pg_proc WHERE proname = 'factory_settle'")).all()
        assert arities == [(18,)]  # the v2 function dropped, v3's replaced by v4's (a model category)
