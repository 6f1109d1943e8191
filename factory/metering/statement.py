"""A tenant's monthly statement: what it used (raw and billed tokens by model and category, energy,
cost), what it bought and what expired unused, for one calendar month in the operator's zone.

Built from the ledger's rows in one read (`Ledger.statement`), so its totals tie out to the usage
rows exactly: tokens and money are integers and Decimals summed exactly, energy is summed with
`math.fsum` (correctly rounded: the total is the same whatever the order of the rows). The same
document is JSON (`/admin/statements`, `factory usage --statement MONTH --format json`) or one CSV
with a `section` column (usage, total, bought, expired).
"""

from __future__ import annotations

import csv
import io
import math
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from factory.metering.schema import LedgerError, Package, UsageRecord

_MONTH = re.compile(r"(\d{4})-(\d{2})")
USAGE_KEYS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "billed_tokens", "overage_tokens")
CSV_FIELDS = (
    "section", "model", "category", "currency", *USAGE_KEYS, "energy_j", "cost", "package", "kind", "plan", "tokens",
    "price", "at", "unused_tokens", "rolled_over_tokens", "expired_tokens",
)  # fmt: skip


def parse_month(text: str) -> tuple[int, int]:
    m = _MONTH.fullmatch(text) if isinstance(text, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise LedgerError(f"a statement's month is YYYY-MM, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build(
    tenant: str, month: str, zone: str, start: datetime, end: datetime, usage: list[UsageRecord],
    bought: list[Package], expired: list[tuple[Package, int]],
) -> dict[str, Any]:  # fmt: skip
    """The statement document. `expired`: (package, tokens it rolled over into the next month)."""
    groups: dict[tuple, dict[str, Any]] = {}
    energy: dict[tuple, list[float]] = {}
    totals: dict[str, dict[str, Any]] = {}
    for u in sorted(usage, key=lambda u: u.request_id):
        key = (u.model, u.category or "", u.currency)
        for where, k in ((groups, key), (totals, u.currency)):
            row = where.setdefault(k, {"requests": 0, **dict.fromkeys(USAGE_KEYS[1:], 0), "cost": Decimal(0)})
            row["requests"] += 1
            row["prompt_tokens"] += u.prompt_tokens
            row["cached_tokens"] += u.cached_tokens
            row["completion_tokens"] += u.completion_tokens
            row["billed_tokens"] += u.billed_tokens
            row["overage_tokens"] += u.overage_tokens
            row["cost"] += u.cost
        energy.setdefault(key, []).append(u.energy_j)
        energy.setdefault(u.currency, []).append(u.energy_j)
    return {
        "tenant": tenant,
        "month": month,
        "timezone": zone,
        "from": start.isoformat(),
        "until": end.isoformat(),
        "usage": [
            {"model": k[0], "category": k[1] or None, "currency": k[2], **row, "energy_j": math.fsum(energy[k])}
            for k, row in sorted(groups.items())
        ],
        "totals": [{"currency": c, **row, "energy_j": math.fsum(energy[c])} for c, row in sorted(totals.items())],
        "bought": [
            {
                "package": p.id,
                "kind": p.kind,
                "plan": p.plan,
                "category": p.category,
                "tokens": p.tokens_total - p.rolled_in,
                "price": p.price,
                "currency": p.currency,
                "at": p.created_at,
            }
            for p in bought
        ],  # fmt: skip
        "expired": [
            {
                "package": p.id,
                "kind": p.kind,
                "plan": p.plan,
                "category": p.category,
                "tokens": p.tokens_total,
                "at": p.expires_at,
                "unused_tokens": p.tokens_available,
                "rolled_over_tokens": rolled,
                "expired_tokens": max(0, p.tokens_available - rolled),
            }
            for p, rolled in expired
        ],  # fmt: skip
    }


def to_csv(doc: dict[str, Any]) -> str:
    """One CSV: a row per usage group, per currency's total, per package bought and expired."""
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    out.writeheader()
    for section, plural in (("usage", "usage"), ("total", "totals"), ("bought", "bought"), ("expired", "expired")):
        for row in doc[plural]:
            out.writerow({"section": section, **{k: _cell(v) for k, v in row.items()}})
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return repr(value)  # every digit: the CSV's energy sums as the JSON's does
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
