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

SCHEMA_VERSION = 3
PRIORITY_CLASSES = ("high", "standard", "low")  # highest first
STATUSES = ("completed", "aborted", "failed")
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
}


def _procedures(conn, version: int) -> None:
    from factory.metering import procedures  # (it imports this module)

    procedures.install(conn, version)


def _v3_token_unit(conn) -> None:
    """One token unit across models (metering/rates.py): a usage row keeps the raw counts and
    adds the prompt tokens served from the prefix cache and what was charged, in factory tokens.
    Rows from before were charged their raw count."""
    for column in ("cached_tokens", "billed_tokens"):
        conn.exec_driver_sql(
            f"ALTER TABLE usage ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0 CHECK ({column} >= 0)"
        )
    conn.exec_driver_sql("UPDATE usage SET billed_tokens = prompt_tokens + completion_tokens")
    _procedures(conn, 3)


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
    " p.expires_at, p.created_at FROM packages p JOIN tenants t ON t.id = p.tenant_id"
)
USAGE_SQL = (
    "SELECT u.request_id, t.name, u.model, u.replica, u.prompt_tokens, u.completion_tokens, u.overage_tokens,"
    " u.energy_j, u.energy_source, u.cost, u.currency, u.status, u.started_at, u.finished_at, u.cached_tokens,"
    " u.billed_tokens FROM usage u JOIN tenants t ON t.id = u.tenant_id"
)
# Soonest expiry first, never-expiring last, then oldest grant: spend what would be lost first.
SPEND_ORDER = "ORDER BY CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id"


def tenant_from(row) -> Tenant:
    return Tenant(row[0], row[1], row[2], from_text(row[3]))


def key_from(row) -> KeyInfo:
    return KeyInfo(row[0], row[1], bool(row[2]), row[3], from_text(row[4]), from_text(row[5]))


def package_from(row) -> Package:
    price = None if row[5] is None else Decimal(row[5])
    return Package(row[0], row[1], row[2], row[3], row[4], price, row[6], from_text(row[7]), from_text(row[8]))


def usage_from(row) -> UsageRecord:
    return UsageRecord(
        *row[:7], float(row[7]), row[8], Decimal(row[9]), row[10], row[11], from_text(row[12]), from_text(row[13]),
        int(row[14]), int(row[15]),
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
    def __init__(self, *, available: int, requested: int = 0, tenant: str = ""):
        super().__init__(f"tenant {tenant!r} asked for {requested} tokens but has {available} available")
        self.available, self.requested, self.tenant = available, requested, tenant


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
