"""The ledger's tables, the records read back from them, and what a valid value is.

One schema for SQLite and PostgreSQL, declared with SQLAlchemy Core (which writes each dialect's
DDL), changed only by numbered migrations. Storage conventions, the same on both:
- times are UTC ISO-8601 text with fixed microsecond precision, so text order is time order
  and `<` / `>=` compare them correctly in SQL;
- money is TEXT holding a Decimal's exact string (a floating column would round it);
- energy is double-precision joules (a measurement, not money); token counts are 64-bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import datetime, timezone
from decimal import Decimal

import sqlalchemy as sa

SCHEMA_VERSION = 4
PRIORITY_CLASSES = ("high", "standard", "low")  # highest first
STATUSES = ("completed", "aborted", "failed")
PLAN_KINDS = ("pack", "monthly", "trial")  # one-off pack, monthly subscription, free trial (once per tenant)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")


def v1_tables(metadata: sa.MetaData) -> None:
    """The ledger's tables at schema v1, as migration 1 creates them on either backend. Frozen: a
    later version adds a migration that alters them, never an edit here."""
    token = sa.BigInteger  # a carrier's package can hold billions of tokens
    sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
    sa.Table(
        "tenants",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.CheckConstraint("priority IN ('high', 'standard', 'low')", name="tenants_priority"),
    )
    # Admin keys belong to no tenant; every other key belongs to exactly one.
    sa.Table(
        "api_keys",
        metadata,
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id")),
        sa.Column("admin", sa.Integer, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("salt_hex", sa.Text, nullable=False),
        sa.Column("hash_hex", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("revoked_at", sa.Text),
        sa.CheckConstraint("admin IN (0, 1)", name="api_keys_admin"),
        sa.CheckConstraint(
            "(admin = 1 AND tenant_id IS NULL) OR (admin = 0 AND tenant_id IS NOT NULL)", name="api_keys_owner"
        ),
    )
    # The last CHECK is the no-overspend invariant: the code keeps it, the database refuses to break it.
    sa.Table(
        "packages",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("tokens_total", token, nullable=False),
        sa.Column("tokens_used", token, nullable=False),
        sa.Column("tokens_reserved", token, nullable=False),
        sa.Column("price", sa.Text),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.CheckConstraint("tokens_total > 0", name="packages_total"),
        sa.CheckConstraint("tokens_used >= 0", name="packages_used"),
        sa.CheckConstraint("tokens_reserved >= 0", name="packages_reserved"),
        sa.CheckConstraint("tokens_used + tokens_reserved <= tokens_total", name="packages_no_overspend"),
        sa.Index("packages_by_tenant", "tenant_id"),
    )
    sa.Table(
        "reservations",
        metadata,
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("tokens", token, nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.CheckConstraint("tokens >= 0", name="reservations_tokens"),
        sa.Index("reservations_by_expiry", "expires_at"),
    )
    # One row per package a reservation took from; seq keeps the order they were taken in.
    sa.Table(
        "reservation_parts",
        metadata,
        sa.Column("request_id", sa.Text, sa.ForeignKey("reservations.request_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("package_id", sa.Integer, sa.ForeignKey("packages.id"), nullable=False),
        sa.Column("tokens", token, nullable=False),
        sa.CheckConstraint("tokens > 0", name="reservation_parts_tokens"),
    )  # fmt: skip
    sa.Table(
        "usage",
        metadata,
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("replica", sa.Text, nullable=False),
        sa.Column("prompt_tokens", token, nullable=False),
        sa.Column("completion_tokens", token, nullable=False),
        sa.Column("overage_tokens", token, nullable=False),
        sa.Column("energy_j", sa.Double, nullable=False),
        sa.Column("energy_source", sa.Text, nullable=False),
        sa.Column("cost", sa.Text, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", sa.Text),
        sa.Column("finished_at", sa.Text, nullable=False),
        sa.CheckConstraint("prompt_tokens >= 0", name="usage_prompt"),
        sa.CheckConstraint("completion_tokens >= 0", name="usage_completion"),
        sa.CheckConstraint("overage_tokens >= 0", name="usage_overage"),
        sa.CheckConstraint("status IN ('completed', 'aborted', 'failed')", name="usage_status"),
        sa.Index("usage_by_tenant_time", "tenant_id", "finished_at"),
        sa.Index("usage_by_time", "finished_at"),
    )


# Version -> the step that takes a ledger from the version before to it, run in one transaction.
MIGRATIONS = {
    1: lambda conn: _create(conn, v1_tables),
    2: lambda conn: _procedures(conn, 2),
    3: lambda conn: _v3_token_unit(conn),
    4: lambda conn: _v4_plans(conn),
}


def _procedures(conn, version: int) -> None:
    from factory.metering import procedures  # (it imports this module)

    procedures.install(conn, version)


def _v3_token_unit(conn) -> None:
    """One token unit across models (metering/rates.py): a usage row keeps the raw counts and
    adds the prompt tokens served from the prefix cache and what was charged, in factory tokens.
    Rows from before were charged their raw count."""
    for column in ("cached_tokens", "billed_tokens"):
        conn.exec_driver_sql(f"ALTER TABLE usage ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0 CHECK ({column} >= 0)")
    conn.exec_driver_sql("UPDATE usage SET billed_tokens = prompt_tokens + completion_tokens")
    _procedures(conn, 3)


def v4_tables(metadata: sa.MetaData) -> None:
    """The plan catalogue and subscriptions, as migration 4 creates them. Frozen, as v1_tables."""
    token = sa.BigInteger
    sa.Table("tenants", metadata, sa.Column("id", sa.Integer, primary_key=True))  # exists: the foreign keys' target
    sa.Table(
        "plans",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("tokens", token, nullable=False),  # factory tokens per pack, trial or month
        sa.Column("price", sa.Text),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("valid_days", sa.Integer),  # pack / trial: lifetime from purchase; null: a pack never expires
        sa.Column("category", sa.Text),  # null: every model
        sa.Column("rollover", sa.Integer, nullable=False),  # monthly: unused tokens carry into the next month
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("retired_at", sa.Text),  # no longer sold; what was bought stands
        sa.CheckConstraint("kind IN ('pack', 'monthly', 'trial')", name="plans_kind"),
        sa.CheckConstraint("tokens > 0", name="plans_tokens"),
        sa.CheckConstraint("valid_days IS NULL OR valid_days > 0", name="plans_valid_days"),
        sa.CheckConstraint("kind <> 'trial' OR valid_days IS NOT NULL", name="plans_trial_expires"),
        sa.CheckConstraint("rollover IN (0, 1) AND (rollover = 0 OR kind = 'monthly')", name="plans_rollover"),
    )
    sa.Table(
        "subscriptions",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("plan_id", sa.Integer, sa.ForeignKey("plans.id"), nullable=False),
        sa.Column("started_at", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),  # IANA zone its calendar months are counted in
        sa.Column("cancelled_at", sa.Text),  # the month under way runs out; no renewal after it
        # one live subscription per tenant and plan
        sa.Index("subscriptions_one_live", "tenant_id", "plan_id", unique=True,
                 sqlite_where=sa.text("cancelled_at IS NULL"), postgresql_where=sa.text("cancelled_at IS NULL")),
    )  # fmt: skip


def _v4_plans(conn) -> None:
    """Plans and categories: a package now says what it is (a pack, a month of a subscription, a
    trial), which model category it covers (null: all), the plan it was bought under, and, for a
    month, its subscription, the period it covers and what it carried over from the month before.
    A tenant has one trial, ever (a unique index, so two purchases at once cannot both pass), and
    a subscription one package per period (so two renewals at once cannot both create it)."""
    _create(conn, v4_tables)
    for column in (
        "kind TEXT NOT NULL DEFAULT 'pack' CHECK (kind IN ('pack', 'monthly', 'trial'))",
        "category TEXT",
        "plan_id INTEGER REFERENCES plans (id)",
        "subscription_id INTEGER REFERENCES subscriptions (id)",
        "period_start TEXT",
        "rolled_in BIGINT NOT NULL DEFAULT 0 CHECK (rolled_in >= 0)",
    ):
        conn.exec_driver_sql(f"ALTER TABLE packages ADD COLUMN {column}")
    conn.exec_driver_sql("ALTER TABLE usage ADD COLUMN category TEXT")  # the model's, when it was served
    conn.exec_driver_sql("CREATE UNIQUE INDEX packages_one_trial ON packages (tenant_id) WHERE kind = 'trial'")
    conn.exec_driver_sql(
        "CREATE UNIQUE INDEX packages_one_period ON packages (subscription_id, period_start)"
        " WHERE subscription_id IS NOT NULL"
    )
    _procedures(conn, 4)


def _create(conn, tables) -> None:
    metadata = sa.MetaData()
    tables(metadata)
    metadata.create_all(conn, checkfirst=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Tenant:
    id: int
    name: str
    priority: str  # one of PRIORITY_CLASSES
    created_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str | None  # None for admin keys
    admin: bool
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class Package:
    id: int
    tenant: str
    tokens_total: int
    tokens_used: int
    tokens_reserved: int
    price: Decimal | None  # what the tenant paid, in `currency`; None if not recorded
    currency: str
    expires_at: datetime | None  # None: never expires
    created_at: datetime
    kind: str = "pack"  # PLAN_KINDS
    category: str | None = None  # the model category it covers; None: every model
    plan: str | None = None  # the plan it was bought under; None: granted directly
    renews_at: datetime | None = None  # a month of a live subscription: when the next month's arrives
    period_start: datetime | None = None  # a month: the start of the calendar month it covers
    rolled_in: int = 0  # of tokens_total, carried over from the month before

    @property
    def tokens_available(self) -> int:
        return self.tokens_total - self.tokens_used - self.tokens_reserved


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    tenant: str
    tokens: int
    expires_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    tenant: str
    model: str
    replica: str
    prompt_tokens: int
    completion_tokens: int
    overage_tokens: int  # consumed beyond every package the tenant had
    energy_j: float
    energy_source: str
    cost: Decimal
    currency: str
    status: str  # completed | aborted | failed
    started_at: datetime | None
    finished_at: datetime
    cached_tokens: int = 0  # of prompt_tokens, served from the prefix cache
    billed_tokens: int = 0  # what was charged, in factory tokens (metering/rates.py)
    category: str | None = None  # the model's category (schema v4; None before, or unmetered by category)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_text(when: datetime) -> str:
    """UTC, fixed width: isoformat() drops the fraction when it is zero, which breaks text order."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when.isoformat()} (ledger times must be timezone-aware)")
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def from_text(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


TENANT_SQL = "SELECT id, name, priority, created_at FROM tenants"
KEY_SQL = (
    "SELECT k.key_id, t.name, k.admin, k.label, k.created_at, k.revoked_at, k.salt_hex, k.hash_hex"
    " FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id"
)
PACKAGE_SQL = (
    "SELECT p.id, t.name, p.tokens_total, p.tokens_used, p.tokens_reserved, p.price, p.currency,"
    " p.expires_at, p.created_at, p.kind, p.category, pl.name,"
    " CASE WHEN s.id IS NOT NULL AND s.cancelled_at IS NULL THEN p.expires_at END, p.period_start, p.rolled_in"
    " FROM packages p JOIN tenants t ON t.id = p.tenant_id LEFT JOIN plans pl ON pl.id = p.plan_id"
    " LEFT JOIN subscriptions s ON s.id = p.subscription_id"
)
PLAN_SQL = (
    "SELECT name, kind, tokens, price, currency, valid_days, category, rollover, created_at, retired_at FROM plans"
)
USAGE_SQL = (
    "SELECT u.request_id, t.name, u.model, u.replica, u.prompt_tokens, u.completion_tokens, u.overage_tokens,"
    " u.energy_j, u.energy_source, u.cost, u.currency, u.status, u.started_at, u.finished_at, u.cached_tokens,"
    " u.billed_tokens, u.category FROM usage u JOIN tenants t ON t.id = u.tenant_id"
)
# The spend order: a trial first (it is free, and it is the one meant to run out), then soonest
# expiry first, never-expiring last, then oldest: spend what would be lost first.
SPEND_ORDER = (
    "ORDER BY CASE WHEN p.kind = 'trial' THEN 0 ELSE 1 END, CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END,"
    " p.expires_at, p.id"
)
# The packages a request for a model of category :category may spend (a None category: any).
COVERS = "(CAST(:category AS TEXT) IS NULL OR p.category IS NULL OR p.category = :category)"


def tenant_from(row) -> Tenant:
    return Tenant(row[0], row[1], row[2], from_text(row[3]))


def key_from(row) -> KeyInfo:
    return KeyInfo(row[0], row[1], bool(row[2]), row[3], from_text(row[4]), from_text(row[5]))


def package_from(row) -> Package:
    price = None if row[5] is None else Decimal(row[5])
    return Package(
        row[0], row[1], row[2], row[3], row[4], price, row[6], from_text(row[7]), from_text(row[8]), row[9], row[10],
        row[11], from_text(row[12]), from_text(row[13]), int(row[14]),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    name: str
    kind: str  # PLAN_KINDS
    tokens: int  # factory tokens per pack, trial or month
    price: Decimal | None
    currency: str
    valid_days: int | None  # pack / trial: days from purchase; None: a pack that never expires
    category: str | None  # None: every model
    rollover: bool  # monthly: unused tokens carry into the next month (else they expire with it)
    created_at: datetime
    retired_at: datetime | None  # no longer sold


def plan_from(row) -> Plan:
    price = None if row[3] is None else Decimal(row[3])
    return Plan(row[0], row[1], int(row[2]), price, row[4], row[5], row[6], bool(row[7]), from_text(row[8]),
                from_text(row[9]))  # fmt: skip


def usage_from(row) -> UsageRecord:
    return UsageRecord(
        *row[:7], float(row[7]), row[8], Decimal(row[9]), row[10], row[11], from_text(row[12]), from_text(row[13]),
        int(row[14]), int(row[15]), row[16],
    )  # fmt: skip


class LedgerError(Exception):
    """A request the ledger refuses; the message is fit to show the user."""


class LedgerUnavailable(Exception):
    """The ledger's database cannot be reached now (a server restarting, a network cut): the
    request is worth retrying later, and nothing was written. Not a LedgerError: not the caller's
    mistake."""


class UnknownTenant(LedgerError):
    def __init__(self, name: str):
        super().__init__(f"unknown tenant {name!r}")
        self.name = name


class QuotaExceeded(LedgerError):
    def __init__(self, *, available: int, requested: int = 0, tenant: str = "", category: str | None = None):
        scope = "" if category is None else f" for category {category!r}"
        super().__init__(f"tenant {tenant!r} asked for {requested} tokens but has {available} available{scope}")
        self.available, self.requested, self.tenant, self.category = available, requested, tenant, category


def when_text(when: datetime | None) -> str | None:
    """`to_text` for arguments: None passes through, bad values become LedgerError."""
    if when is None:
        return None
    if not isinstance(when, datetime):
        raise LedgerError(f"not a datetime: {when!r}")
    try:
        return to_text(when)
    except ValueError as err:
        raise LedgerError(str(err)) from None


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LedgerError(f"bad tenant name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")


def check_category(category: str | None) -> None:
    if category is not None and (not isinstance(category, str) or not _NAME.fullmatch(category)):
        raise LedgerError(f"bad category {category!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")


def check_priority(priority: str) -> None:
    if priority not in PRIORITY_CLASSES:
        raise LedgerError(f"priority must be one of {', '.join(PRIORITY_CLASSES)}, got {priority!r}")


def check_count(value: int, what: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LedgerError(f"{what} must be an integer >= {minimum}, got {value!r}")


def check_real(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise LedgerError(f"{what} must be a finite number >= 0, got {value!r}")


def check_currency(currency: str) -> None:
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise LedgerError(f"currency must be a 3-letter ISO 4217 code such as CNY, got {currency!r}")


def money_text(amount: Decimal, what: str) -> str:
    # Floats are refused, not converted: 0.1 as a float is already not 0.1.
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        raise LedgerError(f"{what} must be a Decimal, got {type(amount).__name__} {amount!r}")
    amount = Decimal(amount)
    if not amount.is_finite() or amount < 0:
        raise LedgerError(f"{what} must be a finite amount >= 0, got {amount}")
    return format(amount, "f")  # fixed point, so the column reads plainly in any SQL tool
