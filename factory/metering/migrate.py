"""`factory ledger migrate --to URL`: copy a ledger (a SQLite file, as a single node grows into a
fleet) into another (PostgreSQL), row for row, ids kept, in one transaction, then prove the copy
by totals read back from both: rows per table, tokens granted, used, reserved and served,
energy, and money per currency to the last digit.

Run it with the factory stopped: a request admitted meanwhile would be in one ledger only.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import sqlalchemy as sa

from factory.metering import store
from factory.metering.ledger import Ledger
from factory.metering.schema import LedgerError

# Parents before children, so every foreign key finds its row.
TABLES = ("tenants", "api_keys", "plans", "subscriptions", "packages", "reservations", "reservation_parts", "usage")


@dataclasses.dataclass(frozen=True)
class Totals:
    rows: dict[str, int]
    tokens: dict[str, int]  # packages' total/used/reserved, usage's prompt/completion/overage/cached/billed
    energy_j: float
    cost: dict[str, Decimal]  # by currency

    def lines(self) -> list[str]:
        out = [f"{table:18} {n:>12} rows" for table, n in self.rows.items()]
        out += [f"{what:18} {n:>12} tokens" for what, n in self.tokens.items()]
        out.append(f"{'energy':18} {self.energy_j:>12.3f} J")
        out += [f"{'cost':18} {format(amount, 'f'):>12} {currency}" for currency, amount in self.cost.items()]
        return out


def totals_in(db: store.Db) -> Totals:
    rows = {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").scalar()) for t in TABLES}
    p = db.execute(
        "SELECT COALESCE(SUM(tokens_total), 0), COALESCE(SUM(tokens_used), 0), COALESCE(SUM(tokens_reserved), 0)"
        " FROM packages"
    ).fetchone()
    u = db.execute(
        "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
        " COALESCE(SUM(overage_tokens), 0), COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(billed_tokens), 0) FROM usage"
    ).fetchone()
    # Money and energy summed here, in one order (Python's, not a collation's): SQL would sum the
    # TEXT money as floats, and floats summed in another order can differ in the last bit.
    cost: dict[str, Decimal] = {}
    energy = 0.0
    for _, amount, currency, energy_j in sorted(db.execute("SELECT request_id, cost, currency, energy_j FROM usage")):
        cost[currency] = cost.get(currency, Decimal(0)) + Decimal(amount)
        energy += energy_j
    names = ("granted", "used", "reserved", "prompt", "completion", "overage", "cached", "billed")
    return Totals(rows, dict(zip(names, (int(n) for n in (*p, *u)), strict=True)), energy, dict(sorted(cost.items())))


def copy(source: Ledger, target: Ledger) -> Totals:
    """Copy every row of `source` into the empty `target`; returns the verified totals.
    LedgerError if `target` already holds a ledger or the copy does not tie out."""
    if source.url == target.url:
        raise LedgerError("the source and the target are the same ledger")
    metadata = sa.MetaData()
    with target.transaction() as out, source.transaction(write=False) as src:
        if out.execute("SELECT COUNT(*) FROM tenants").scalar():
            raise LedgerError(f"{target.where} already holds a ledger: migrate only into an empty one")
        # Both opened at this factory's schema version: the source's columns are the target's.
        for name in TABLES:
            table = sa.Table(name, metadata, autoload_with=src.conn)
            rows = [dict(r._mapping) for r in src.conn.execute(sa.select(table))]
            if rows:
                out.conn.execute(table.insert(), rows)
        store.reset_identities(out, [metadata.tables[t] for t in ("tenants", "plans", "subscriptions", "packages")])
        # Checked before the commit: a copy that does not tie out leaves the target as it was.
        before, after = totals_in(src), totals_in(out)
        if before != after:
            raise LedgerError(f"the copy does not tie out: source {before}, target {after}")
    return after
