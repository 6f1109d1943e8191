"""What a request's energy and GPU time cost, in the operator's currency.

cost = kWh × tariff × PUE + GPU price per hour × the request's share of replica time (h).
Money is Decimal end to end: floats (joules, seconds) enter through Decimal(repr(x)), so 0.1 J is
exactly Decimal("0.1"), never the binary float's 0.1000000000000000055…; no float maths on money.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

UTC = timezone.utc
J_PER_KWH = Decimal(3_600_000)
S_PER_H = Decimal(3600)
# Results are quantized to 1e-12 so equal costs print and store identically however they were
# summed; that is far below any currency's smallest unit, so no billable amount is lost.
COST_QUANTUM = Decimal("1e-12")
# Working precision for one cost: exact for the products of any realistic inputs (a float's repr
# has at most 17 significant digits), so the only rounding is the final quantize.
_PREC = 60
_DAY_US = 86_400 * 1_000_000
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True)
class TouPeriod:
    """A time-of-use tariff: [start, end) local wall clock; end <= start wraps midnight."""

    start: time
    end: time
    price_per_kwh: Decimal


def _us(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def _clock(us: int) -> str:
    return (datetime.min + timedelta(microseconds=us)).time().isoformat() if us < _DAY_US else "24:00:00"


def _price(name: str, value: Decimal) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise ValueError(f"{name} must be a finite Decimal >= 0, got {value!r}")
    return value


def _exact(name: str, x: float | int | Decimal) -> Decimal:
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x!r}")
        d = Decimal(repr(x))
    elif isinstance(x, (int, Decimal)):
        d = Decimal(x)
    else:
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not d.is_finite() or d < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
    return d


class CostModel:
    """Prices energy (flat or time-of-use tariff, times PUE) and GPU time.

    Simplification: a request is priced at one instant, its finish time (`at`), so a request that
    spans a tariff boundary pays the later period's tariff for all of its energy.
    """

    def __init__(
        self,
        *,
        currency: str,
        price_per_kwh: Decimal | None = None,
        tou: Sequence[TouPeriod] = (),
        pue: Decimal = Decimal("1"),
        gpu_price_per_hour: Decimal = Decimal("0"),
        tz: tzinfo = UTC,
    ):
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
            raise ValueError(f"currency must be 3 uppercase letters (ISO 4217), got {currency!r}")
        if (price_per_kwh is None) == (not tou):
            raise ValueError("give exactly one of price_per_kwh (flat) or tou (time-of-use periods)")
        if not isinstance(pue, Decimal) or not pue.is_finite() or pue < 1:
            raise ValueError(f"pue must be a finite Decimal >= 1, got {pue!r}")
        self.currency = currency
        self.price_per_kwh = None if price_per_kwh is None else _price("price_per_kwh", price_per_kwh)
        self.pue = pue
        self.gpu_price_per_hour = _price("gpu_price_per_hour", gpu_price_per_hour)
        self.tz = tz
        self.tou = tuple(tou)
        # Each period as one or two [start, end) segments in microseconds since local midnight.
        segments: list[tuple[int, int, Decimal]] = []
        for p in self.tou:
            if p.start.tzinfo is not None or p.end.tzinfo is not None:
                raise ValueError(f"tou times are local wall clock in tz; give naive times, got {p}")
            price = _price(f"tou price at {p.start.isoformat()}", p.price_per_kwh)
            a, b = _us(p.start), _us(p.end)
            if b > a:
                segments.append((a, b, price))
            else:  # wraps midnight (start == end: the whole day)
                segments.append((a, _DAY_US, price))
                if b > 0:
                    segments.append((0, b, price))
        segments.sort(key=lambda s: s[0])
        at_us = 0
        for a, b, _ in segments:
            if a > at_us:
                raise ValueError(f"tou periods leave a gap: {_clock(at_us)}-{_clock(a)} has no price")
            if a < at_us:
                raise ValueError(f"tou periods overlap: {_clock(a)}-{_clock(min(at_us, b))} is priced twice")
            at_us = b
        if self.tou and at_us < _DAY_US:
            raise ValueError(f"tou periods leave a gap: {_clock(at_us)}-24:00:00 has no price")
        self._segments = segments

    def price_per_kwh_at(self, at: datetime) -> Decimal:
        """The tariff (currency per kWh) in force at `at` (timezone-aware)."""
        if self.price_per_kwh is not None:
            return self.price_per_kwh
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware: a naive time cannot pick a time-of-use period")
        local_us = _us(at.astimezone(self.tz).time())
        for a, b, price in self._segments:
            if a <= local_us < b:
                return price
        raise AssertionError("tou segments cover the day")  # checked in __init__

    def cost(self, *, energy_j: float, busy_s: float, at: datetime) -> Decimal:
        """Cost in self.currency of energy_j joules and busy_s seconds of replica time, priced at
        `at` (the request's finish time), quantized to 1e-12 with ROUND_HALF_EVEN."""
        e = _exact("energy_j", energy_j)
        s = _exact("busy_s", busy_s)
        tariff = self.price_per_kwh_at(at)
        with localcontext() as ctx:
            ctx.prec = _PREC
            amount = e * tariff * self.pue / J_PER_KWH + self.gpu_price_per_hour * s / S_PER_H
            return amount.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)

    def describe(self) -> dict:
        """The model for logs and status; prices as strings."""
        return {
            "currency": self.currency,
            "price_per_kwh": None if self.price_per_kwh is None else str(self.price_per_kwh),
            "tou": [
                {"start": p.start.isoformat(), "end": p.end.isoformat(), "price_per_kwh": str(p.price_per_kwh)}
                for p in self.tou
            ],
            "pue": str(self.pue),
            "gpu_price_per_hour": str(self.gpu_price_per_hour),
            "tz": str(self.tz),
        }


def money_json(amount: Decimal, currency: str) -> dict:
    """{"amount": plain decimal string (never an exponent), "currency": code} for API bodies."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"amount must be a Decimal, got {type(amount).__name__}")
    return {"amount": format(amount, "f"), "currency": currency}
