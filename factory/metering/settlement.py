"""Spending a tenant's packages: taking tokens for a reservation, charging a settlement,
handing back a release. Functions over an open transaction (`db`), called by the Ledger inside a
transaction that holds the tenant's write lock (store.py); plain SQL with `:named` parameters.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal

from factory.metering.schema import (
    COVERS,
    SPEND_ORDER,
    STATUSES,
    USAGE_SQL,
    LedgerError,
    Tenant,
    UnknownTenant,
    UsageRecord,
    check_category,
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

LIVE = "(p.expires_at IS NULL OR p.expires_at > :now)"  # the package has not expired at the bound time


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """A settlement's values, checked, in the ledger's storage form; both backends write these."""

    request_id: str
    tenant: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of prompt_tokens, served from the prefix cache
    billed_tokens: int  # what it is charged, in factory tokens (metering/rates.py)
    energy_j: float
    energy_source: str
    cost: str  # money_text
    currency: str
    model: str
    replica: str
    status: str
    started_at: str | None  # when_text
    finished_at: datetime
    reserved: bool
    category: str | None = None  # the model's category: what an unreserved charge may spend


def checked(
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
    reserved: bool = False,
    cached_tokens: int = 0,
    billed_tokens: int | None = None,
    category: str | None = None,
) -> Settlement:
    """Check what a request used before anything is written. `billed_tokens`: factory tokens
    (default the raw count, prompt + completion: rates of 1). `reserved`: it was admitted with a
    reservation."""
    check_count(prompt_tokens, "prompt_tokens")
    check_count(completion_tokens, "completion_tokens")
    check_count(cached_tokens, "cached_tokens")
    if cached_tokens > prompt_tokens:
        raise LedgerError(f"cached_tokens ({cached_tokens}) exceeds prompt_tokens ({prompt_tokens})")
    if billed_tokens is None:
        billed_tokens = prompt_tokens + completion_tokens
    check_count(billed_tokens, "billed_tokens")
    check_real(energy_j, "energy_j")
    check_currency(currency)
    check_category(category)
    if status not in STATUSES:
        raise LedgerError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    finished_at = finished_at or utcnow()
    when_text(finished_at)  # a naive or non-datetime value is refused here
    return Settlement(
        request_id, tenant, prompt_tokens, completion_tokens, cached_tokens, billed_tokens, float(energy_j),
        energy_source, money_text(cost, "cost"), currency, model, replica, status, when_text(started_at),
        finished_at, bool(reserved), category,
    )  # fmt: skip


def settle(db, request_id: str, **fields) -> UsageRecord:
    """Charge `request_id` what it used (`checked`'s fields). If its reservation is gone (it
    outlived its ttl and was released), it is charged from whatever the tenant has left, the
    rest recorded as overage: served is paid for, late or not."""
    s = checked(request_id, **fields)
    if existing := db.execute(USAGE_SQL + " WHERE u.request_id = :r", r=request_id).fetchone():
        return usage_from(existing)  # a retried settlement must not charge twice
    overage_tok = 0
    held = db.execute(
        "SELECT r.tenant_id, t.name FROM reservations r JOIN tenants t ON t.id = r.tenant_id WHERE r.request_id = :r",
        r=request_id,
    ).fetchone()
    if held is None and not s.reserved:  # never reserved (auth disabled): nothing to charge, only to record
        insert_tenant(db, s.tenant, "standard")
        owner_id = tenant_id(db, s.tenant)
    elif held is None:  # reserved once, but the reservation expired before this settlement
        owner_id = tenant_id(db, s.tenant)
        overage_tok = charge_available(db, owner_id, s.billed_tokens, s.finished_at, s.category)
    else:
        owner_id, holder = held
        if holder != s.tenant:
            raise LedgerError(f"request {request_id!r} was reserved for {holder!r}, not {s.tenant!r}")
        left = s.billed_tokens
        parts = db.execute(
            "SELECT package_id, tokens FROM reservation_parts WHERE request_id = :r ORDER BY seq", r=request_id
        ).fetchall()
        for package_id, part in parts:
            charge = min(left, part)
            db.execute(
                "UPDATE packages SET tokens_reserved = tokens_reserved - :part, tokens_used = tokens_used + :charge"
                " WHERE id = :id",
                part=part, charge=charge, id=package_id,
            )  # fmt: skip
            left -= charge
        drop_reservation(db, request_id)
        # Used more than reserved: take the excess from whatever is still available (the
        # reservation's own packages included).
        overage_tok = charge_available(db, owner_id, left, s.finished_at, s.category)
    db.execute(
        "INSERT INTO usage (request_id, tenant_id, model, replica, prompt_tokens, completion_tokens, overage_tokens,"
        " energy_j, energy_source, cost, currency, status, started_at, finished_at, cached_tokens, billed_tokens,"
        " category) VALUES (:r, :tenant_id, :model, :replica, :prompt, :completion, :overage, :energy_j, :source,"
        " :cost, :currency, :status, :started_at, :finished_at, :cached, :billed, :category)",
        r=request_id, tenant_id=owner_id, model=s.model, replica=s.replica, prompt=s.prompt_tokens,
        completion=s.completion_tokens, overage=overage_tok, energy_j=s.energy_j, source=s.energy_source,
        cost=s.cost, currency=s.currency, status=s.status, started_at=s.started_at,
        finished_at=when_text(s.finished_at), cached=s.cached_tokens, billed=s.billed_tokens, category=s.category,
    )  # fmt: skip
    return usage_from(db.execute(USAGE_SQL + " WHERE u.request_id = :r", r=request_id).fetchone())


def charge_available(db, tenant_id: int, tokens: int, at: datetime, category: str | None = None) -> int:
    """Charge `tokens` to the tenant's live packages covering `category` in spending order;
    returns what no package could cover (the overage)."""
    for package_id, part in split(spendable(db, tenant_id, at, category), tokens):
        db.execute("UPDATE packages SET tokens_used = tokens_used + :part WHERE id = :id", part=part, id=package_id)
        tokens -= part
    return tokens


def release(db, request_id: str) -> bool:
    held = db.execute("SELECT tenant_id FROM reservations WHERE request_id = :r", r=request_id).fetchone()
    if held is None:
        return False
    db.lock_tenant_ids([held[0]])
    # Under the lock, again: another process may have settled or released it meanwhile.
    parts = db.execute("SELECT package_id, tokens FROM reservation_parts WHERE request_id = :r", r=request_id)
    parts = parts.fetchall()
    if not db.execute("SELECT 1 FROM reservations WHERE request_id = :r", r=request_id).fetchone():
        return False
    for package_id, part in parts:
        db.execute(
            "UPDATE packages SET tokens_reserved = tokens_reserved - :part WHERE id = :id", part=part, id=package_id
        )
    drop_reservation(db, request_id)
    return True


def drop_reservation(db, request_id: str) -> None:
    db.execute("DELETE FROM reservation_parts WHERE request_id = :r", r=request_id)
    db.execute("DELETE FROM reservations WHERE request_id = :r", r=request_id)


def spendable(db, tenant_id: int, now: datetime, category: str | None = None) -> list[tuple[int, int]]:
    """(package_id, available tokens) of the tenant's live packages that cover `category` (None:
    any package), in spending order."""
    free = "p.tokens_total - p.tokens_used - p.tokens_reserved"
    rows = db.execute(
        f"SELECT p.id, {free} FROM packages p WHERE p.tenant_id = :tenant_id AND {LIVE} AND {COVERS} AND {free} > 0"
        f" {SPEND_ORDER}",
        tenant_id=tenant_id, now=when_text(now), category=category,
    )  # fmt: skip
    return [(package_id, int(available)) for package_id, available in rows]


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
    row = db.execute("SELECT id FROM tenants WHERE name = :name", name=name).fetchone()
    if row is None:
        raise UnknownTenant(name)
    return row[0]


def insert_tenant(db, name: str, priority: str) -> Tenant | None:
    """The new tenant, or None if one by that name exists (the UNIQUE name decides, so two
    processes adding the same tenant at once both succeed, one of them as a no-op)."""
    check_name(name)
    row = db.execute(
        "INSERT INTO tenants (name, priority, created_at) VALUES (:name, :priority, :now)"
        " ON CONFLICT (name) DO NOTHING RETURNING id, name, priority, created_at",
        name=name, priority=priority, now=when_text(utcnow()),
    ).fetchone()  # fmt: skip
    return None if row is None else tenant_from(row)
