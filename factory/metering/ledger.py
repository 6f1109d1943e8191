"""The ledger: tenants, API keys, prepaid token packages, reservations and usage, in SQLite
(the embedded default, one file) or PostgreSQL (a server every node can reach).

A request's life: `reserve` takes its worst case (prompt + max_tokens) out of the tenant's
packages before the engine runs; `settle` charges what it actually used and hands back the
rest (or `release` hands back everything if it never ran). Every write is one transaction that
first excludes every other writer of the same tenant (store.py: SQLite's write lock, PostgreSQL's
row lock on the tenant), so no interleaving of any number of processes on any number of nodes
can overspend a package; the packages table's CHECK makes the database refuse an overspend even
if this code had a bug.

The SQL here and in `settlement.py` (which spends packages) and `keys.py` is written once with
`:named` parameters; what differs between the backends is in `store.py`.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from factory.metering import keys, procedures, settlement, store
from factory.metering.schema import (
    MIGRATIONS,
    PACKAGE_SQL,
    PLAN_KINDS,
    PLAN_SQL,
    PRIORITY_CLASSES,
    SCHEMA_VERSION,
    SPEND_ORDER,
    TENANT_SQL,
    USAGE_SQL,
    KeyInfo,
    LedgerError,
    LedgerUnavailable,
    Package,
    Plan,
    QuotaExceeded,
    Reservation,
    Tenant,
    UnknownTenant,
    UsageRecord,
    check_category,
    check_count,
    check_currency,
    check_name,
    check_priority,
    check_real,
    money_text,
    package_from,
    plan_from,
    tenant_from,
    usage_from,
    utcnow,
    when_text,
)

__all__ = [
    "PRIORITY_CLASSES", "KeyInfo", "Ledger", "LedgerError", "LedgerUnavailable", "Package", "Plan", "QuotaExceeded",
    "Reservation", "Tenant", "UnknownTenant", "UsageRecord", "default_ledger",
]  # fmt: skip


def default_ledger() -> str:
    """$FACTORY_LEDGER (a path or a postgresql:// URL), else $FACTORY_HOME/ledger.db."""
    from factory.models import factory_home

    env = os.environ.get("FACTORY_LEDGER")
    if env:
        return env if "://" in env else str(Path(env).expanduser())
    return str(factory_home() / "ledger.db")


class Ledger:
    def __init__(self, target: str | Path, *, pool_size: int = 5):
        """`target`: a SQLite file path, `sqlite:///path` or `postgresql://user@host:port/db`."""
        self.url = store.ledger_url(target)
        self.where = store.describe(self.url)  # for messages: never the password
        self._engine = store.open_engine(self.url, pool_size=pool_size)
        # PostgreSQL: the hot writes are calls of the server-side functions of procedures.py (migration 2).
        self._calls = None if store.is_sqlite(self.url) else store.Calls(self._engine)
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self, write: bool = True):
        """One transaction; a database that cannot be reached becomes LedgerUnavailable."""
        try:
            with store.transaction(self._engine, write) as db:
                yield db
        except SQLAlchemyError as err:
            if store.unavailable(err):
                raise LedgerUnavailable(store.first_line(err)) from err
            raise

    def _migrate(self) -> None:
        with self.transaction(write=False) as db:
            version = self._version(db)
        if version == SCHEMA_VERSION:
            return  # the common case takes no write lock, so many processes can open at once
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerError(f"{self.where} has ledger schema v{version}; this factory knows v{SCHEMA_VERSION}")
        with self.transaction() as db:
            store.lock_for_migration(db)
            version = self._version(db) or 0  # again, under the lock: another opener may have done it
            for step in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](db.conn)
                db.execute("INSERT INTO schema_version (version) VALUES (:v)", v=step)

    @staticmethod
    def _version(db: store.Db) -> int | None:
        if not db.conn.dialect.has_table(db.conn, "schema_version"):
            return None
        return db.execute("SELECT MAX(version) FROM schema_version").scalar()

    # -- tenants and keys -------------------------------------------------------------------

    def create_tenant(self, name: str, priority: str = "standard") -> Tenant:
        check_name(name)
        check_priority(priority)
        with self.transaction() as db:
            tenant = settlement.insert_tenant(db, name, priority)
        if tenant is None:  # the name's UNIQUE constraint: refused by the database, not raced past it
            raise LedgerError(f"tenant {name!r} already exists")
        return tenant

    def get_tenant(self, name: str) -> Tenant | None:
        with self.transaction(write=False) as db:
            row = db.execute(TENANT_SQL + " WHERE name = :name", name=name).fetchone()
        return None if row is None else tenant_from(row)

    def ensure_tenant(self, name: str, priority: str = "standard") -> Tenant:
        check_priority(priority)
        if tenant := self.get_tenant(name):  # read first: no write lock on every anonymous request
            return tenant
        with self.transaction() as db:
            settlement.insert_tenant(db, name, priority)
            return tenant_from(db.execute(TENANT_SQL + " WHERE name = :name", name=name).fetchone())

    def list_tenants(self) -> list[Tenant]:
        with self.transaction(write=False) as db:
            return [tenant_from(r) for r in db.execute(TENANT_SQL + " ORDER BY name")]

    def set_priority(self, name: str, priority: str) -> Tenant:
        check_priority(priority)
        with self.transaction() as db:
            settlement.tenant_id(db, name)
            db.execute("UPDATE tenants SET priority = :priority WHERE name = :name", priority=priority, name=name)
            return tenant_from(db.execute(TENANT_SQL + " WHERE name = :name", name=name).fetchone())

    def create_key(self, tenant: str | None, *, admin: bool = False, label: str = "") -> tuple[KeyInfo, str]:
        """(info, token). The token is returned here once and stored nowhere, only its hash."""
        if admin != (tenant is None):
            raise LedgerError("admin keys belong to no tenant" if admin else "a key needs a tenant (or admin=True)")
        with self.transaction() as db:
            return keys.insert(db, None if admin else settlement.tenant_id(db, tenant), label)

    def verify_key(self, token: str) -> KeyInfo | None:
        with self.transaction(write=False) as db:
            return keys.verify(db, token)

    def revoke_key(self, key_id: str) -> bool:
        with self.transaction() as db:
            return keys.revoke(db, key_id)

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        with self.transaction(write=False) as db:
            return keys.select(db, None if tenant is None else settlement.tenant_id(db, tenant))

    # -- packages ---------------------------------------------------------------------------

    def grant_package(
        self,
        tenant: str,
        tokens: int,
        *,
        expires_at: datetime | None = None,
        price: Decimal | None = None,
        currency: str = "CNY",
        category: str | None = None,
    ) -> Package:
        """A pack given directly (no plan): `tokens` factory tokens for models of `category`
        (None: every model)."""
        check_count(tokens, "tokens", minimum=1)
        price_text = None if price is None else money_text(price, "price")
        check_currency(currency)
        check_category(category)
        now = when_text(utcnow())
        if expires_at is not None and when_text(expires_at) <= now:
            raise LedgerError(f"expiry {expires_at.isoformat()} is already past")
        with self.transaction() as db:
            return _insert_package(
                db, settlement.tenant_id(db, tenant), tokens=tokens, price=price_text, currency=currency,
                expires_at=when_text(expires_at), now=now, category=category,
            )  # fmt: skip

    # -- plans ------------------------------------------------------------------------------

    def create_plan(
        self,
        name: str,
        kind: str,
        tokens: int,
        *,
        price: Decimal | None = None,
        currency: str = "CNY",
        valid_days: int | None = None,
        category: str | None = None,
        rollover: bool = False,
    ) -> Plan:
        """A plan of the catalogue: a one-off `pack` (valid `valid_days` from purchase, or for
        ever), a `monthly` subscription (an allowance each calendar month; `rollover` carries the
        unused tokens into the next month, else they expire with it) or a free `trial` (once per
        tenant, valid `valid_days`). `category` limits it to models of that category."""
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise LedgerError(f"bad plan name {name!r}: 1-64 printable characters")
        if kind not in PLAN_KINDS:
            raise LedgerError(f"kind must be one of {', '.join(PLAN_KINDS)}, got {kind!r}")
        check_count(tokens, "tokens", minimum=1)
        if valid_days is not None:
            check_count(valid_days, "valid_days", minimum=1)
        if kind == "trial" and valid_days is None:
            raise LedgerError("a trial needs valid_days: it is meant to run out")
        if kind == "monthly" and valid_days is not None:
            raise LedgerError("a monthly plan runs by calendar month: valid_days does not apply")
        if rollover and kind != "monthly":
            raise LedgerError("rollover applies to monthly plans only")
        check_category(category)
        check_currency(currency)
        price_text = None if price is None else money_text(price, "price")
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO plans (name, kind, tokens, price, currency, valid_days, category, rollover,"
                    " created_at) VALUES (:name, :kind, :tokens, :price, :currency, :valid_days, :category,"
                    " :rollover, :now)",
                    name=name, kind=kind, tokens=tokens, price=price_text, currency=currency, valid_days=valid_days,
                    category=category, rollover=int(bool(rollover)), now=when_text(utcnow()),
                )  # fmt: skip
                return _plan(db, name)[1]
        except IntegrityError as err:
            if store.duplicate_key(err):
                raise LedgerError(f"plan {name!r} already exists") from None
            raise

    def list_plans(self, include_retired: bool = False) -> list[Plan]:
        where = "" if include_retired else " WHERE retired_at IS NULL"
        with self.transaction(write=False) as db:
            return [plan_from(r) for r in db.execute(PLAN_SQL + where + " ORDER BY name")]

    def retire_plan(self, name: str) -> Plan:
        """Stop selling a plan; what tenants bought stands, and live subscriptions go on renewing
        until they are cancelled."""
        with self.transaction() as db:
            _plan(db, name)
            db.execute("UPDATE plans SET retired_at = :now WHERE name = :name AND retired_at IS NULL",
                       now=when_text(utcnow()), name=name)  # fmt: skip
            return _plan(db, name)[1]

    def buy(self, tenant: str, plan: str, *, now: datetime | None = None, tz: str = "UTC") -> Package:
        """The tenant buys `plan`: its package (for a monthly plan, a subscription and this
        month's package; its months are calendar months in `tz`, the operator's IANA zone, kept
        with the subscription so that every renewal counts them the same). A second trial, or a
        second live subscription to one plan, is refused."""
        now = now or utcnow()
        zone = _zone(tz)
        kind = None
        try:
            with self.transaction() as db:
                tenant_id = db.lock_tenants([tenant]).get(tenant)
                if tenant_id is None:
                    raise UnknownTenant(tenant)
                plan_id, p = _plan(db, plan)
                kind = p.kind
                if p.retired_at is not None:
                    raise LedgerError(f"plan {plan!r} is no longer sold")
                price = None if p.price is None else money_text(p.price, "price")
                fields = dict(tokens=p.tokens, price=price, currency=p.currency, kind=p.kind, category=p.category,
                              plan_id=plan_id, now=when_text(now))  # fmt: skip
                if p.kind != "monthly":
                    expires = None if p.valid_days is None else when_text(now + timedelta(days=p.valid_days))
                    return _insert_package(db, tenant_id, expires_at=expires, **fields)
                sub_id = db.execute(
                    "INSERT INTO subscriptions (tenant_id, plan_id, started_at, timezone) VALUES (:t, :p, :now, :tz)"
                    " RETURNING id",
                    t=tenant_id, p=plan_id, now=when_text(now), tz=tz,
                ).scalar_one()  # fmt: skip
                start = month_start(now, zone)
                return _insert_package(
                    db, tenant_id, expires_at=when_text(next_month(start)), subscription_id=sub_id,
                    period_start=when_text(start), **fields,
                )  # fmt: skip
        except IntegrityError as err:
            if store.duplicate_key(err):
                what = "its free trial" if kind == "trial" else f"a live subscription to {plan!r}"
                raise LedgerError(f"tenant {tenant!r} already has {what}") from None
            raise

    def cancel_subscription(self, tenant: str, plan: str) -> bool:
        """No renewal after the month under way (which runs out as bought). False if there was
        no live subscription."""
        with self.transaction() as db:
            tenant_id = settlement.tenant_id(db, tenant)
            plan_id, _ = _plan(db, plan)
            done = db.execute(
                "UPDATE subscriptions SET cancelled_at = :now WHERE tenant_id = :t AND plan_id = :p"
                " AND cancelled_at IS NULL RETURNING id",
                now=when_text(utcnow()), t=tenant_id, p=plan_id,
            ).fetchall()  # fmt: skip
        return bool(done)

    def renew(self, *, now: datetime | None = None, tenant: str | None = None) -> list[Package]:
        """Give every live subscription (of `tenant`, or all) its package for the calendar month
        (in the subscription's zone) that contains `now`, if it has none yet; returns the packages
        created. Run by the ledger service every minute and when a subscriber's reservation finds
        nothing left.

        A rollover plan carries the tokens the month before left free into the new month (tokens
        a request still holds stay with the month that admitted it, which that request is
        charged to). Each subscription renews in its own transaction; two renewals at once
        create one package (a unique index), so the loser skips it."""
        now = now or utcnow()
        with self.transaction(write=False) as db:
            where = "" if tenant is None else " AND s.tenant_id = :tenant_id"
            tenant_id = None if tenant is None else settlement.tenant_id(db, tenant)
            live = db.execute(
                "SELECT s.id, s.tenant_id, s.timezone, (SELECT MAX(p.period_start) FROM packages p"
                " WHERE p.subscription_id = s.id) FROM subscriptions s WHERE s.cancelled_at IS NULL" + where
                + " ORDER BY s.id",
                tenant_id=tenant_id,
            ).fetchall()  # fmt: skip
        due = []
        for sub_id, owner_id, zone, latest in live:
            start = month_start(now, _zone(zone))
            if latest is None or latest < when_text(start):
                due.append((sub_id, owner_id, start))
        created = []
        for sub_id, owner_id, start in due:
            try:
                with self.transaction() as db:
                    db.lock_tenant_ids([owner_id])
                    if (package := _renew(db, sub_id, owner_id, start, now)) is not None:
                        created.append(package)
            except IntegrityError as err:
                if not store.duplicate_key(err):
                    raise
        return created

    def categories(self, tenant: str, now: datetime | None = None) -> set[str | None]:
        """The categories the tenant's live packages cover (None: a package for every model)."""
        with self.transaction(write=False) as db:
            rows = db.execute(
                "SELECT DISTINCT p.category FROM packages p WHERE p.tenant_id = :tenant_id AND " + settlement.LIVE,
                tenant_id=settlement.tenant_id(db, tenant), now=when_text(now or utcnow()),
            )  # fmt: skip
            return {r[0] for r in rows}

    def list_packages(self, tenant: str, live_only: bool = False, now: datetime | None = None) -> list[Package]:
        """The tenant's packages in spending order: all, or only those not expired at `now`."""
        live = " AND " + settlement.LIVE if live_only else ""
        with self.transaction(write=False) as db:
            tenant_id = settlement.tenant_id(db, tenant)
            rows = db.execute(
                PACKAGE_SQL + " WHERE p.tenant_id = :tenant_id" + live + " " + SPEND_ORDER,
                tenant_id=tenant_id, now=when_text(now or utcnow()),
            )  # fmt: skip
            return [package_from(r) for r in rows]

    def balance(self, tenant: str, now: datetime | None = None) -> dict:
        """Token totals over the tenant's packages that have not expired at `now`."""
        with self.transaction(write=False) as db:
            row = db.execute(
                "SELECT COALESCE(SUM(tokens_total), 0), COALESCE(SUM(tokens_used), 0),"
                " COALESCE(SUM(tokens_reserved), 0) FROM packages p WHERE p.tenant_id = :tenant_id AND "
                + settlement.LIVE,
                tenant_id=settlement.tenant_id(db, tenant), now=when_text(now or utcnow()),
            ).fetchone()  # fmt: skip
        total, used, reserved = (int(n) for n in row)  # PostgreSQL sums 64-bit columns as NUMERIC
        return {"total": total, "used": used, "reserved": reserved, "available": total - used - reserved}

    # -- reservation and settlement ---------------------------------------------------------

    def reserve(
        self,
        request_id: str,
        tenant: str,
        tokens: int,
        *,
        ttl_s: float,
        now: datetime | None = None,
        category: str | None = None,
    ) -> Reservation:
        """Hold `tokens` of the tenant's live packages that cover `category` (the model's; None:
        any package) for `request_id` until it is settled, released, or `ttl_s` seconds pass.
        QuotaExceeded if fewer are available."""
        check_count(tokens, "tokens")
        check_category(category)
        check_real(ttl_s, "ttl_s")
        if ttl_s == 0:
            raise LedgerError("ttl_s must be > 0: a reservation that expires at once holds nothing")
        now = now or utcnow()
        expires_at = now + timedelta(seconds=ttl_s)
        taken = LedgerError(f"request {request_id!r} is already reserved or settled")
        try:
            if self._calls is not None:
                args = (request_id, tenant, tokens, when_text(expires_at), when_text(now), category)
                self._call(
                    procedures.RESERVE_CALL,
                    args,
                    request_id=request_id,
                    tenant=tenant,
                    tokens=tokens,
                    category=category,
                )
                return Reservation(request_id, tenant, tokens, expires_at)
            with self.transaction() as db:
                tenant_id = db.lock_tenants([tenant]).get(tenant)
                if tenant_id is None:
                    raise UnknownTenant(tenant)
                for table in ("reservations", "usage"):
                    if db.execute(f"SELECT 1 FROM {table} WHERE request_id = :r", r=request_id).fetchone():
                        raise taken
                spendable = settlement.spendable(db, tenant_id, now, category)
                available = sum(n for _, n in spendable)
                if available < tokens:
                    raise QuotaExceeded(available=available, requested=tokens, tenant=tenant, category=category)
                db.execute(
                    "INSERT INTO reservations (request_id, tenant_id, tokens, expires_at, created_at)"
                    " VALUES (:r, :tenant_id, :tokens, :expires_at, :now)",
                    r=request_id, tenant_id=tenant_id, tokens=tokens, expires_at=when_text(expires_at),
                    now=when_text(now),
                )  # fmt: skip
                for seq, (package_id, part) in enumerate(settlement.split(spendable, tokens)):
                    db.execute(
                        "UPDATE packages SET tokens_reserved = tokens_reserved + :part WHERE id = :id",
                        part=part, id=package_id,
                    )  # fmt: skip
                    db.execute(
                        "INSERT INTO reservation_parts (request_id, seq, package_id, tokens)"
                        " VALUES (:r, :seq, :package_id, :part)",
                        r=request_id, seq=seq, package_id=package_id, part=part,
                    )  # fmt: skip
        except IntegrityError as err:
            if store.duplicate_key(err):  # the same id reserved at once for another tenant
                raise taken from None
            raise
        return Reservation(request_id, tenant, tokens, expires_at)

    def settle(self, request_id: str, **fields) -> UsageRecord:
        """Record what `request_id` used and charge it; the fields are `settlement.settle`'s."""
        if self._calls is not None:
            args = _settle_args(request_id, **fields)
            return usage_from(self._call(procedures.SETTLE_CALL, args, request_id=request_id)[0])
        with self.transaction() as db:
            db.lock_tenants([fields.get("tenant")] if isinstance(fields.get("tenant"), str) else [])
            return settlement.settle(db, request_id, **fields)

    def settle_many(self, settlements: list[dict]) -> list[UsageRecord]:
        """Settle a batch in one transaction (one commit for all): all or nothing."""
        if self._calls is not None:
            batch = [_settle_args(**fields) for fields in settlements]  # all checked before any is sent
            try:
                with self._calls.transaction(args[1] for args in batch) as call:
                    return [usage_from(call(procedures.SETTLE_CALL, args)[0]) for args in batch]
            except psycopg.Error as err:
                raise self._refused(err) from None
        with self.transaction() as db:
            db.lock_tenants(s["tenant"] for s in settlements if isinstance(s.get("tenant"), str))
            return [settlement.settle(db, **fields) for fields in settlements]

    def _call(self, sql: str, args: tuple, **context) -> list[tuple]:
        """One call of a PostgreSQL function (procedures.py), its own transaction."""
        try:
            return self._calls.call(sql, args)
        except psycopg.Error as err:
            raise self._refused(err, **context) from None

    @staticmethod
    def _refused(err: psycopg.Error, **context) -> Exception:
        """A function's refusal as the ledger's exception; a server out of reach as LedgerUnavailable."""
        if (refused := procedures.refusal(err, **context)) is not None:
            return refused
        if isinstance(err, psycopg.OperationalError):
            return LedgerUnavailable(store.first_line(err))
        return err

    def release(self, request_id: str) -> bool:
        """Hand back a reservation that will never be settled; False if there is none."""
        with self.transaction() as db:
            return settlement.release(db, request_id)

    def release_expired(self, now: datetime | None = None) -> int:
        with self.transaction() as db:
            expired = db.execute(
                "SELECT request_id, tenant_id FROM reservations WHERE expires_at <= :now",
                now=when_text(now or utcnow()),
            ).fetchall()
            db.lock_tenant_ids(tenant_id for _, tenant_id in expired)
            return sum(settlement.release(db, request_id) for request_id, _ in expired)

    # -- usage ------------------------------------------------------------------------------

    def usage(
        self,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[UsageRecord]:
        """Records that finished in [since, until), newest first."""
        with self.transaction(write=False) as db:
            where, params = _usage_filter(db, tenant, since, until)
            sql = USAGE_SQL + where + " ORDER BY u.finished_at DESC, u.request_id DESC"
            if limit is not None:
                check_count(limit, "limit")
                sql, params = sql + " LIMIT :limit", params | {"limit": limit}
            return [usage_from(r) for r in db.execute(sql, **params)]

    def statement(self, tenant: str, month: str, *, tz: str = "UTC", now: datetime | None = None) -> dict:
        """The tenant's statement for calendar `month` (YYYY-MM) in zone `tz`: usage by model and
        category, totals, packages bought and packages expired (metering/statement.py), read in
        one transaction so the parts agree."""
        from factory.metering import statement

        year, mon = statement.parse_month(month)
        start = datetime(year, mon, 1, tzinfo=_zone(tz))
        end = next_month(start)
        now = now or utcnow()
        span = {"since": when_text(start), "until": when_text(end)}
        with self.transaction(write=False) as db:
            tenant_id = settlement.tenant_id(db, tenant)
            usage = [usage_from(r) for r in db.execute(
                USAGE_SQL + " WHERE u.tenant_id = :t AND u.finished_at >= :since AND u.finished_at < :until",
                t=tenant_id, **span,
            )]  # fmt: skip
            bought = [package_from(r) for r in db.execute(
                PACKAGE_SQL + " WHERE p.tenant_id = :t AND p.created_at >= :since AND p.created_at < :until"
                " ORDER BY p.created_at, p.id", t=tenant_id, **span,
            )]  # fmt: skip
            # Expired within the month (so far; one expiring at midnight on the 1st belongs to the
            # month it ends), with what each rolled into the month after it.
            expired = [(package_from(r[:-1]), int(r[-1])) for r in db.execute(
                PACKAGE_SQL.replace(" FROM packages p", ", COALESCE((SELECT n.rolled_in FROM packages n WHERE"
                " n.subscription_id = p.subscription_id AND n.period_start = p.expires_at), 0) FROM packages p")
                + " WHERE p.tenant_id = :t AND p.expires_at > :since AND p.expires_at <= :until"
                " AND p.expires_at <= :now ORDER BY p.expires_at, p.id", t=tenant_id, now=when_text(now), **span,
            )]  # fmt: skip
        return statement.build(tenant, month, tz, start, end, usage, bought, expired)

    def usage_summary(self, tenant: str | None = None, since: datetime | None = None) -> list[dict]:
        """Per tenant (and currency, if a tenant was billed in several): totals since `since`."""
        with self.transaction(write=False) as db:
            where, params = _usage_filter(db, tenant, since, None)
            rows = db.execute(
                "SELECT t.name, u.prompt_tokens, u.completion_tokens, u.energy_j, u.cost, u.currency, u.cached_tokens,"
                " u.billed_tokens FROM usage u JOIN tenants t ON t.id = u.tenant_id" + where,
                **params,
            ).fetchall()
        # Summed here, not by SQL SUM(cost): that would turn the TEXT money into floats.
        totals: dict[tuple[str, str], dict] = {}
        for name, prompt_tok, completion_tok, energy_j, cost, currency, cached_tok, billed_tok in rows:
            t = totals.setdefault((name, currency), dict(tenant=name, requests=0, prompt_tokens=0,
                completion_tokens=0, cached_tokens=0, billed_tokens=0, energy_j=0.0, cost=Decimal(0),
                currency=currency))  # fmt: skip
            t["requests"] += 1
            t["prompt_tokens"] += prompt_tok
            t["completion_tokens"] += completion_tok
            t["cached_tokens"] += cached_tok
            t["billed_tokens"] += billed_tok
            t["energy_j"] += energy_j
            t["cost"] += Decimal(cost)
        return [totals[k] for k in sorted(totals)]


# -- inside a transaction -----------------------------------------------------------------


def _settle_args(request_id: str, **fields) -> tuple:
    """`factory_settle`'s arguments, in order, checked as settlement.settle checks them."""
    s = settlement.checked(request_id, **fields)
    if not s.reserved:
        check_name(s.tenant)  # it may be a new tenant
    return (
        s.request_id, s.tenant, s.prompt_tokens, s.completion_tokens, s.energy_j, s.energy_source, s.cost, s.currency,
        s.model, s.replica, s.status, s.started_at, when_text(s.finished_at), s.reserved, when_text(utcnow()),
        s.cached_tokens, s.billed_tokens, s.category,
    )  # fmt: skip


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise LedgerError(f"unknown time zone {name!r}: use an IANA name such as Asia/Shanghai") from None


def month_start(at: datetime, tz: tzinfo) -> datetime:
    """Midnight of the 1st of the calendar month in `tz` that contains `at`."""
    local = at.astimezone(tz)
    return datetime(local.year, local.month, 1, tzinfo=tz)


def next_month(start: datetime) -> datetime:
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return datetime(year, month, 1, tzinfo=start.tzinfo)


def _plan(db, name: str) -> tuple[int, Plan]:
    """(its id, the plan) of the plan called `name`."""
    row = db.execute(PLAN_SQL.replace("SELECT ", "SELECT id, ", 1) + " WHERE name = :name", name=name).fetchone()
    if row is None:
        raise LedgerError(f"unknown plan {name!r}")
    return row[0], plan_from(row[1:])


def _insert_package(db, tenant_id: int, *, tokens: int, now: str, kind: str = "pack", rolled_in: int = 0,
                    **fields) -> Package:  # fmt: skip
    """Insert a package; `fields`: price, currency, expires_at, category, plan_id, subscription_id,
    period_start (each None where it does not apply)."""
    values = dict.fromkeys(("price", "currency", "expires_at", "category", "plan_id", "subscription_id",
                            "period_start"))  # fmt: skip
    values.update(fields)
    package_id = db.execute(
        "INSERT INTO packages (tenant_id, tokens_total, tokens_used, tokens_reserved, price, currency, expires_at,"
        " created_at, kind, category, plan_id, subscription_id, period_start, rolled_in) VALUES (:tenant_id, :tokens,"
        " 0, 0, :price, :currency, :expires_at, :now, :kind, :category, :plan_id, :subscription_id, :period_start,"
        " :rolled_in) RETURNING id",
        tenant_id=tenant_id, tokens=tokens, now=now, kind=kind, rolled_in=rolled_in, **values,
    ).scalar_one()  # fmt: skip
    return package_from(db.execute(PACKAGE_SQL + " WHERE p.id = :id", id=package_id).fetchone())


def _renew(db, sub_id: int, tenant_id: int, start: datetime, now: datetime) -> Package | None:
    """This month's package of subscription `sub_id`, under the tenant's lock; None if it exists
    or the subscription was cancelled meanwhile."""
    sub = db.execute(
        "SELECT pl.id, pl.tokens, pl.price, pl.currency, pl.category, pl.rollover FROM subscriptions s"
        " JOIN plans pl ON pl.id = s.plan_id WHERE s.id = :id AND s.cancelled_at IS NULL",
        id=sub_id,
    ).fetchone()  # fmt: skip
    period = when_text(start)
    if (
        sub is None
        or db.execute(
            "SELECT 1 FROM packages WHERE subscription_id = :id AND period_start = :start", id=sub_id, start=period
        ).fetchone()
    ):
        return None
    plan_id, tokens, price, currency, category, rollover = sub
    rolled = 0
    if rollover:  # only from the month just ended: a month nobody renewed carried nothing
        prev = db.execute(
            "SELECT tokens_total - tokens_used - tokens_reserved FROM packages WHERE subscription_id = :id"
            " AND expires_at = :start",
            id=sub_id, start=period,
        ).fetchone()  # fmt: skip
        rolled = int(prev[0]) if prev else 0
    return _insert_package(
        db, tenant_id, tokens=int(tokens) + rolled, rolled_in=rolled, price=price, currency=currency,
        expires_at=when_text(next_month(start)), category=category, plan_id=plan_id, subscription_id=sub_id,
        period_start=period, kind="monthly", now=when_text(now),
    )  # fmt: skip


def _usage_filter(db, tenant: str | None, since: datetime | None, until: datetime | None) -> tuple[str, dict]:
    clauses, params = [], {}
    for name, op, value in (("since", ">=", since), ("until", "<", until)):
        if value is not None:
            clauses.append(f"u.finished_at {op} :{name}")
            params[name] = when_text(value)
    if tenant is not None:
        clauses.append("u.tenant_id = :tenant_id")
        params["tenant_id"] = settlement.tenant_id(db, tenant)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
