"""The ledger: tenants, API keys, prepaid token packages, reservations and usage, in SQLite.

A request's life: `reserve` takes its worst case (prompt + max_tokens) out of the tenant's
packages before the engine runs; `settle` charges what it actually used and hands back the
rest (or `release` hands back everything if it never ran). Every write is one
`BEGIN IMMEDIATE` transaction, so writers in any number of processes queue on the database's
write lock and no interleaving can overspend a package; the packages table's CHECK makes
SQLite refuse an overspend even if this code had a bug.

SQLite-specific code lives in `_connect`, `_transaction` and `_migrate`; the rest, here and in
`settlement.py` (which spends packages), is plain SQL with `?` placeholders that a PostgreSQL
backend could reuse.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from factory.metering import keys, settlement
from factory.metering.schema import (
    DDL,
    PACKAGE_SQL,
    PRIORITY_CLASSES,
    SCHEMA_VERSION,
    SPEND_ORDER,
    TENANT_SQL,
    USAGE_SQL,
    KeyInfo,
    LedgerError,
    Package,
    QuotaExceeded,
    Reservation,
    Tenant,
    UnknownTenant,
    UsageRecord,
    check_count,
    check_currency,
    check_name,
    check_priority,
    check_real,
    money_text,
    package_from,
    tenant_from,
    usage_from,
    utcnow,
    when_text,
)

__all__ = [
    "PRIORITY_CLASSES", "KeyInfo", "Ledger", "LedgerError", "Package", "QuotaExceeded", "Reservation",
    "Tenant", "UnknownTenant", "UsageRecord", "default_ledger_path",
]  # fmt: skip


def default_ledger_path() -> Path:
    from factory.models import factory_home

    env = os.environ.get("FACTORY_LEDGER")
    return Path(env).expanduser() if env else factory_home() / "ledger.db"


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by this process's threads
        self._conn = self._connect(self.path)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- the SQLite corner ------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so Python never opens a
        # deferred transaction behind our back (under WAL one can fail to upgrade to a write).
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: only the first opener pays for it
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash may lose the last commits, never corrupts
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextlib.contextmanager
    def _transaction(self, write: bool = True):
        """Writers take the write lock up front (IMMEDIATE), so no other process can slip a
        write in between a transaction's reads and its writes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        try:
            with self._transaction(write=False) as db:
                version = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        except sqlite3.OperationalError:  # no such table: a new ledger
            version = None
        if version == SCHEMA_VERSION:
            return  # the common case takes no write lock, so many processes can open at once
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema v{version}; this factory knows v{SCHEMA_VERSION}")
        with self._transaction() as db:
            for statement in DDL:
                db.execute(statement)
            if db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    # -- tenants and keys -------------------------------------------------------------------

    def create_tenant(self, name: str, priority: str = "standard") -> Tenant:
        check_name(name)
        check_priority(priority)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise LedgerError(f"tenant {name!r} already exists")
            return settlement.insert_tenant(db, name, priority)

    def get_tenant(self, name: str) -> Tenant | None:
        with self._transaction(write=False) as db:
            row = db.execute(TENANT_SQL + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else tenant_from(row)

    def ensure_tenant(self, name: str, priority: str = "standard") -> Tenant:
        check_priority(priority)
        if tenant := self.get_tenant(name):  # read first: no write lock on every anonymous request
            return tenant
        with self._transaction() as db:
            row = db.execute(TENANT_SQL + " WHERE name = ?", (name,)).fetchone()
            return tenant_from(row) if row else settlement.insert_tenant(db, name, priority)

    def list_tenants(self) -> list[Tenant]:
        with self._transaction(write=False) as db:
            return [tenant_from(r) for r in db.execute(TENANT_SQL + " ORDER BY name")]

    def set_priority(self, name: str, priority: str) -> Tenant:
        check_priority(priority)
        with self._transaction() as db:
            settlement.tenant_id(db, name)
            db.execute("UPDATE tenants SET priority = ? WHERE name = ?", (priority, name))
            return tenant_from(db.execute(TENANT_SQL + " WHERE name = ?", (name,)).fetchone())

    def create_key(self, tenant: str | None, *, admin: bool = False, label: str = "") -> tuple[KeyInfo, str]:
        """(info, token). The token is returned here once and stored nowhere, only its hash."""
        if admin != (tenant is None):
            raise LedgerError("admin keys belong to no tenant" if admin else "a key needs a tenant (or admin=True)")
        with self._transaction() as db:
            return keys.insert(db, None if admin else settlement.tenant_id(db, tenant), label)

    def verify_key(self, token: str) -> KeyInfo | None:
        with self._transaction(write=False) as db:
            return keys.verify(db, token)

    def revoke_key(self, key_id: str) -> bool:
        with self._transaction() as db:
            return keys.revoke(db, key_id)

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        with self._transaction(write=False) as db:
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
    ) -> Package:
        check_count(tokens, "tokens", minimum=1)
        price_text = None if price is None else money_text(price, "price")
        check_currency(currency)
        now = when_text(utcnow())
        if expires_at is not None and when_text(expires_at) <= now:
            raise LedgerError(f"expiry {expires_at.isoformat()} is already past")
        with self._transaction() as db:
            (package_id,) = db.execute(
                "INSERT INTO packages (tenant_id, tokens_total, tokens_used, tokens_reserved, price, currency,"
                " expires_at, created_at) VALUES (?, ?, 0, 0, ?, ?, ?, ?) RETURNING id",
                (settlement.tenant_id(db, tenant), tokens, price_text, currency, when_text(expires_at), now),
            ).fetchone()
            return package_from(db.execute(PACKAGE_SQL + " WHERE p.id = ?", (package_id,)).fetchone())

    def list_packages(self, tenant: str) -> list[Package]:
        """All of the tenant's packages, expired ones included, in spending order."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                PACKAGE_SQL + " WHERE p.tenant_id = ? " + SPEND_ORDER, (settlement.tenant_id(db, tenant),)
            )
            return [package_from(r) for r in rows]

    def balance(self, tenant: str, now: datetime | None = None) -> dict:
        """Token totals over the tenant's packages that have not expired at `now`."""
        with self._transaction(write=False) as db:
            total, used, reserved = db.execute(
                "SELECT COALESCE(SUM(tokens_total), 0), COALESCE(SUM(tokens_used), 0),"
                " COALESCE(SUM(tokens_reserved), 0) FROM packages p WHERE p.tenant_id = ? AND " + settlement.LIVE,
                (settlement.tenant_id(db, tenant), when_text(now or utcnow())),
            ).fetchone()
        return {"total": total, "used": used, "reserved": reserved, "available": total - used - reserved}

    # -- reservation and settlement ---------------------------------------------------------

    def reserve(
        self, request_id: str, tenant: str, tokens: int, *, ttl_s: float, now: datetime | None = None
    ) -> Reservation:
        """Hold `tokens` of the tenant's live packages for `request_id` until it is settled,
        released, or `ttl_s` seconds pass. QuotaExceeded if fewer are available."""
        check_count(tokens, "tokens")
        check_real(ttl_s, "ttl_s")
        if ttl_s == 0:
            raise LedgerError("ttl_s must be > 0: a reservation that expires at once holds nothing")
        now = now or utcnow()
        expires_at = now + timedelta(seconds=ttl_s)
        with self._transaction() as db:
            tenant_id = settlement.tenant_id(db, tenant)
            for table in ("reservations", "usage"):
                if db.execute(f"SELECT 1 FROM {table} WHERE request_id = ?", (request_id,)).fetchone():
                    raise LedgerError(f"request {request_id!r} is already reserved or settled")
            spendable = settlement.spendable(db, tenant_id, now)
            available = sum(n for _, n in spendable)
            if available < tokens:
                raise QuotaExceeded(available=available, requested=tokens, tenant=tenant)
            db.execute(
                "INSERT INTO reservations (request_id, tenant_id, tokens, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (request_id, tenant_id, tokens, when_text(expires_at), when_text(now)),
            )
            for seq, (package_id, part) in enumerate(settlement.split(spendable, tokens)):
                db.execute("UPDATE packages SET tokens_reserved = tokens_reserved + ? WHERE id = ?", (part, package_id))
                db.execute(
                    "INSERT INTO reservation_parts (request_id, seq, package_id, tokens) VALUES (?, ?, ?, ?)",
                    (request_id, seq, package_id, part),
                )
        return Reservation(request_id, tenant, tokens, expires_at)

    def settle(self, request_id: str, **fields) -> UsageRecord:
        """Record what `request_id` used and charge it; the fields are `settlement.settle`'s."""
        with self._transaction() as db:
            return settlement.settle(db, request_id, **fields)

    def settle_many(self, settlements: list[dict]) -> list[UsageRecord]:
        """Settle a batch in one transaction (one commit for all): all or nothing."""
        with self._transaction() as db:
            return [settlement.settle(db, **fields) for fields in settlements]

    def release(self, request_id: str) -> bool:
        """Hand back a reservation that will never be settled; False if there is none."""
        with self._transaction() as db:
            return settlement.release(db, request_id)

    def release_expired(self, now: datetime | None = None) -> int:
        with self._transaction() as db:
            expired = db.execute(
                "SELECT request_id FROM reservations WHERE expires_at <= ?", (when_text(now or utcnow()),)
            ).fetchall()
            return sum(settlement.release(db, request_id) for (request_id,) in expired)

    # -- usage ------------------------------------------------------------------------------

    def usage(
        self,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[UsageRecord]:
        """Records that finished in [since, until), newest first."""
        with self._transaction(write=False) as db:
            where, params = _usage_filter(db, tenant, since, until)
            sql = USAGE_SQL + where + " ORDER BY u.finished_at DESC, u.request_id DESC"
            if limit is not None:
                check_count(limit, "limit")
                sql, params = sql + " LIMIT ?", [*params, limit]
            return [usage_from(r) for r in db.execute(sql, params)]

    def usage_summary(self, tenant: str | None = None, since: datetime | None = None) -> list[dict]:
        """Per tenant (and currency, if a tenant was billed in several): totals since `since`."""
        with self._transaction(write=False) as db:
            where, params = _usage_filter(db, tenant, since, None)
            rows = db.execute(
                "SELECT t.name, u.prompt_tokens, u.completion_tokens, u.energy_j, u.cost, u.currency"
                " FROM usage u JOIN tenants t ON t.id = u.tenant_id" + where,
                params,
            ).fetchall()
        # Summed here, not by SQL SUM(cost): that would turn the TEXT money into floats.
        totals: dict[tuple[str, str], dict] = {}
        for name, prompt_tok, completion_tok, energy_j, cost, currency in rows:
            t = totals.setdefault((name, currency), dict(tenant=name, requests=0, prompt_tokens=0,
                completion_tokens=0, energy_j=0.0, cost=Decimal(0), currency=currency))  # fmt: skip
            t["requests"] += 1
            t["prompt_tokens"] += prompt_tok
            t["completion_tokens"] += completion_tok
            t["energy_j"] += energy_j
            t["cost"] += Decimal(cost)
        return [totals[k] for k in sorted(totals)]


# -- inside a transaction -----------------------------------------------------------------


def _usage_filter(db, tenant: str | None, since: datetime | None, until: datetime | None) -> tuple[str, list]:
    clauses, params = [], []
    for clause, value in (("u.finished_at >= ?", since), ("u.finished_at < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(when_text(value))
    if tenant is not None:
        clauses.append("u.tenant_id = ?")
        params.append(settlement.tenant_id(db, tenant))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
