"""Spending a tenant's packages: taking tokens for a reservation, charging a settlement,
handing back a release. Functions over an open transaction (`db`), called by the Ledger inside
its `BEGIN IMMEDIATE`; plain SQL with `?` placeholders.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from factory.metering.schema import (
    SPEND_ORDER,
    STATUSES,
    USAGE_SQL,
    LedgerError,
    Tenant,
    UnknownTenant,
    UsageRecord,
    check_count,
    check_currency,
    check_name,
    check_real,
    money_text,
    tenant_from,
    usage_from,
    utcnow,
    when_text,
)

LIVE = "(p.expires_at IS NULL OR p.expires_at > ?)"  # the package has not expired at the bound time


def settle(
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
        tenant_id = known[0] if known else insert_tenant(db, tenant, "standard").id
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
        drop_reservation(db, request_id)
        # Used more than reserved: take the excess from whatever is still available (the
        # reservation's own packages included) and record what no package could cover.
        for package_id, part in split(spendable(db, tenant_id, finished_at), left):
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


def release(db, request_id: str) -> bool:
    if not db.execute("SELECT 1 FROM reservations WHERE request_id = ?", (request_id,)).fetchone():
        return False
    parts = db.execute("SELECT package_id, tokens FROM reservation_parts WHERE request_id = ?", (request_id,))
    for package_id, part in parts.fetchall():
        db.execute("UPDATE packages SET tokens_reserved = tokens_reserved - ? WHERE id = ?", (part, package_id))
    drop_reservation(db, request_id)
    return True


def drop_reservation(db, request_id: str) -> None:
    db.execute("DELETE FROM reservation_parts WHERE request_id = ?", (request_id,))
    db.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))


def spendable(db, tenant_id: int, now: datetime) -> list[tuple[int, int]]:
    """(package_id, available tokens) of the tenant's live packages, in spending order."""
    free = "p.tokens_total - p.tokens_used - p.tokens_reserved"
    return db.execute(
        f"SELECT p.id, {free} FROM packages p WHERE p.tenant_id = ? AND {LIVE} AND {free} > 0 {SPEND_ORDER}",
        (tenant_id, when_text(now)),
    ).fetchall()


def split(spendable: list[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """(package_id, tokens) parts of `tokens` taken greedily in order; short if they run out."""
    parts = []
    for package_id, available in spendable:
        if tokens <= 0:
            break
        parts.append((package_id, min(available, tokens)))
        tokens -= parts[-1][1]
    return parts


def tenant_id(db, name: str) -> int:
    row = db.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise UnknownTenant(name)
    return row[0]


def insert_tenant(db, name: str, priority: str) -> Tenant:
    check_name(name)
    row = db.execute(
        "INSERT INTO tenants (name, priority, created_at) VALUES (?, ?, ?) RETURNING id, name, priority, created_at",
        (name, priority, when_text(utcnow())),
    ).fetchone()
    return tenant_from(row)
