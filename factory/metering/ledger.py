"""The ledger: tenants, API keys, prepaid token packages, reservations and usage, in SQLite.

A request's life: `reserve` takes its worst case (prompt + max_tokens) out of the tenant's
packages before the engine runs; `settle` charges what it actually used and hands back the
rest (or `release` hands back everything if it never ran). Every write is one
`BEGIN IMMEDIATE` transaction, so writers in any number of processes queue on the database's
write lock and no interleaving can overspend a package; the packages table's CHECK makes
SQLite refuse an overspend even if this code had a bug.

SQLite-specific code lives in `_connect`, `_transaction` and `_migrate`; the rest is plain
SQL (with `?` placeholders) that a PostgreSQL backend could reuse.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from factory.metering import keys
from factory.metering.schema import (
    DDL,
    PACKAGE_SQL,
    PRIORITY_CLASSES,
    SCHEMA_VERSION,
    SPEND_ORDER,
    STATUSES,
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
            return _insert_tenant(db, name, priority)

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
            return tenant_from(row) if row else _insert_tenant(db, name, priority)

    def list_tenants(self) -> list[Tenant]:
        with self._transaction(write=False) as db:
            return [tenant_from(r) for r in db.execute(TENANT_SQL + " ORDER BY name")]

    def set_priority(self, name: str, priority: str) -> Tenant:
        check_priority(priority)
        with self._transaction() as db:
            _tenant_id(db, name)
            db.execute("UPDATE tenants SET priority = ? WHERE name = ?", (priority, name))
            return tenant_from(db.execute(TENANT_SQL + " WHERE name = ?", (name,)).fetchone())

    def create_key(self, tenant: str | None, *, admin: bool = False, label: str = "") -> tuple[KeyInfo, str]:
        """(info, token). The token is returned here once and stored nowhere, only its hash."""
        if admin != (tenant is None):
            raise LedgerError("admin keys belong to no tenant" if admin else "a key needs a tenant (or admin=True)")
        with self._transaction() as db:
            return keys.insert(db, None if admin else _tenant_id(db, tenant), label)

    def verify_key(self, token: str) -> KeyInfo | None:
        with self._transaction(write=False) as db:
            return keys.verify(db, token)

    def revoke_key(self, key_id: str) -> bool:
        with self._transaction() as db:
            return keys.revoke(db, key_id)

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        with self._transaction(write=False) as db:
            return keys.select(db, None if tenant is None else _tenant_id(db, tenant))

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
                (_tenant_id(db, tenant), tokens, price_text, currency, when_text(expires_at), now),
            ).fetchone()
            return package_from(db.execute(PACKAGE_SQL + " WHERE p.id = ?", (package_id,)).fetchone())

    def list_packages(self, tenant: str) -> list[Package]:
        """All of the tenant's packages, expired ones included, in spending order."""
        with self._transaction(write=False) as db:
            rows = db.execute(PACKAGE_SQL + " WHERE p.tenant_id = ? " + SPEND_ORDER, (_tenant_id(db, tenant),))
            return [package_from(r) for r in rows]

    def balance(self, tenant: str, now: datetime | None = None) -> dict:
        """Token totals over the tenant's packages that have not expired at `now`."""
        with self._transaction(write=False) as db:
            total, used, reserved = db.execute(
                "SELECT COALESCE(SUM(tokens_total), 0), COALESCE(SUM(tokens_used), 0),"
                " COALESCE(SUM(tokens_reserved), 0) FROM packages p WHERE p.tenant_id = ? AND " + _LIVE,
                (_tenant_id(db, tenant), when_text(now or utcnow())),
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
            tenant_id = _tenant_id(db, tenant)
            for table in ("reservations", "usage"):
                if db.execute(f"SELECT 1 FROM {table} WHERE request_id = ?", (request_id,)).fetchone():
                    raise LedgerError(f"request {request_id!r} is already reserved or settled")
            spendable = _spendable(db, tenant_id, now)
            available = sum(n for _, n in spendable)
            if available < tokens:
                raise QuotaExceeded(available=available, requested=tokens, tenant=tenant)
            db.execute(
                "INSERT INTO reservations (request_id, tenant_id, tokens, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (request_id, tenant_id, tokens, when_text(expires_at), when_text(now)),
            )
            for seq, (package_id, part) in enumerate(_split(spendable, tokens)):
                db.execute("UPDATE packages SET tokens_reserved = tokens_reserved + ? WHERE id = ?", (part, package_id))
                db.execute(
                    "INSERT INTO reservation_parts (request_id, seq, package_id, tokens) VALUES (?, ?, ?, ?)",
                    (request_id, seq, package_id, part),
                )
        return Reservation(request_id, tenant, tokens, expires_at)

    def settle(self, request_id: str, **fields) -> UsageRecord:
        """Record what `request_id` used and charge it; the fields are `_settle`'s."""
        with self._transaction() as db:
            return _settle(db, request_id, **fields)

    def settle_many(self, settlements: list[dict]) -> list[UsageRecord]:
        """Settle a batch in one transaction (one commit for all): all or nothing."""
        with self._transaction() as db:
            return [_settle(db, **fields) for fields in settlements]

    def release(self, request_id: str) -> bool:
        """Hand back a reservation that will never be settled; False if there is none."""
        with self._transaction() as db:
            return _release(db, request_id)

    def release_expired(self, now: datetime | None = None) -> int:
        with self._transaction() as db:
            expired = db.execute(
                "SELECT request_id FROM reservations WHERE expires_at <= ?", (when_text(now or utcnow()),)
            ).fetchall()
            return sum(_release(db, request_id) for (request_id,) in expired)

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

_LIVE = "(p.expires_at IS NULL OR p.expires_at > ?)"  # the package has not expired at the bound time


def _settle(
    db,
    request_id: str,
    *,
    tenant: str,
    prompt_tokens: int,
    completion_tokens: int,
    energy_j: float,
    energy_source: str,
    cost: Decimal,
    currency: str,
    model: str,
    replica: str = "",
    status: str = "completed",
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
) -> UsageRecord:
    if existing := db.execute(USAGE_SQL + " WHERE u.request_id = ?", (request_id,)).fetchone():
        return usage_from(existing)  # a retried settlement must not charge twice
    check_count(prompt_tokens, "prompt_tokens")
    check_count(completion_tokens, "completion_tokens")
    check_real(energy_j, "energy_j")
    check_currency(currency)
    if status not in STATUSES:
        raise LedgerError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    cost_text = money_text(cost, "cost")
    finished_at = finished_at or utcnow()
    overage_tok = 0
    held = db.execute(
        "SELECT r.tenant_id, t.name FROM reservations r JOIN tenants t ON t.id = r.tenant_id WHERE r.request_id = ?",
        (request_id,),
    ).fetchone()
    if held is None:  # never reserved (auth disabled): nothing to charge, only to record
        known = db.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
        tenant_id = known[0] if known else _insert_tenant(db, tenant, "standard").id
    else:
        tenant_id, holder = held
        if holder != tenant:
            raise LedgerError(f"request {request_id!r} was reserved for {holder!r}, not {tenant!r}")
        left = prompt_tokens + completion_tokens
        parts = db.execute(
            "SELECT package_id, tokens FROM reservation_parts WHERE request_id = ? ORDER BY seq", (request_id,)
        ).fetchall()
        for package_id, part in parts:
            charge = min(left, part)
            db.execute(
                "UPDATE packages SET tokens_reserved = tokens_reserved - ?, tokens_used = tokens_used + ? WHERE id = ?",
                (part, charge, package_id),
            )
            left -= charge
        _drop_reservation(db, request_id)
        # Used more than reserved: take the excess from whatever is still available (the
        # reservation's own packages included) and record what no package could cover.
        for package_id, part in _split(_spendable(db, tenant_id, finished_at), left):
            db.execute("UPDATE packages SET tokens_used = tokens_used + ? WHERE id = ?", (part, package_id))
            left -= part
        overage_tok = left
    db.execute(
        "INSERT INTO usage (request_id, tenant_id, model, replica, prompt_tokens, completion_tokens, overage_tokens,"
        " energy_j, energy_source, cost, currency, status, started_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (request_id, tenant_id, model, replica, prompt_tokens, completion_tokens, overage_tok, float(energy_j),
         energy_source, cost_text, currency, status, when_text(started_at), when_text(finished_at)),
    )  # fmt: skip
    return usage_from(db.execute(USAGE_SQL + " WHERE u.request_id = ?", (request_id,)).fetchone())


def _release(db, request_id: str) -> bool:
    if not db.execute("SELECT 1 FROM reservations WHERE request_id = ?", (request_id,)).fetchone():
        return False
    parts = db.execute("SELECT package_id, tokens FROM reservation_parts WHERE request_id = ?", (request_id,))
    for package_id, part in parts.fetchall():
        db.execute("UPDATE packages SET tokens_reserved = tokens_reserved - ? WHERE id = ?", (part, package_id))
    _drop_reservation(db, request_id)
    return True


def _drop_reservation(db, request_id: str) -> None:
    db.execute("DELETE FROM reservation_parts WHERE request_id = ?", (request_id,))
    db.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))


def _spendable(db, tenant_id: int, now: datetime) -> list[tuple[int, int]]:
    """(package_id, available tokens) of the tenant's live packages, in spending order."""
    free = "p.tokens_total - p.tokens_used - p.tokens_reserved"
    return db.execute(
        f"SELECT p.id, {free} FROM packages p WHERE p.tenant_id = ? AND {_LIVE} AND {free} > 0 {SPEND_ORDER}",
        (tenant_id, when_text(now)),
    ).fetchall()


def _split(spendable: list[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """(package_id, tokens) parts of `tokens` taken greedily in order; short if they run out."""
    parts = []
    for package_id, available in spendable:
        if tokens <= 0:
            break
        parts.append((package_id, min(available, tokens)))
        tokens -= parts[-1][1]
    return parts


def _usage_filter(db, tenant: str | None, since: datetime | None, until: datetime | None) -> tuple[str, list]:
    clauses, params = [], []
    for clause, value in (("u.finished_at >= ?", since), ("u.finished_at < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(when_text(value))
    if tenant is not None:
        clauses.append("u.tenant_id = ?")
        params.append(_tenant_id(db, tenant))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _tenant_id(db, name: str) -> int:
    row = db.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise UnknownTenant(name)
    return row[0]


def _insert_tenant(db, name: str, priority: str) -> Tenant:
    check_name(name)
    row = db.execute(
        "INSERT INTO tenants (name, priority, created_at) VALUES (?, ?, ?) RETURNING id, name, priority, created_at",
        (name, priority, when_text(utcnow())),
    ).fetchone()
    return tenant_from(row)
