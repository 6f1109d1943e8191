"""Cost: exact Decimal prices of energy (flat or time-of-use, times PUE) and GPU time."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from factory.metering.cost import CostModel, TouPeriod, money_json

UTC = timezone.utc
BEIJING = timezone(timedelta(hours=8))
NOON_UTC = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
# Peak 08:00-22:00, off-peak 22:00-08:00 (wraps midnight), Beijing time.
PEAK_OFFPEAK = (
    TouPeriod(time(8), time(22), Decimal("1.2")),
    TouPeriod(time(22), time(8), Decimal("0.4")),
)


def test_flat_tariff_prices_kwh_exactly_and_quantizes_to_1e_12():
    model = CostModel(currency="CNY", price_per_kwh=Decimal("0.6"))
    cost = model.cost(energy_j=3_600_000.0, busy_s=0.0, at=NOON_UTC)
    assert str(cost) == "0.600000000000"
    # 1 J = 1/3.6e6 kWh: a repeating decimal, rounded half-even at the 12th place.
    one_joule = CostModel(currency="USD", price_per_kwh=Decimal("1")).cost(energy_j=1.0, busy_s=0.0, at=NOON_UTC)
    assert str(one_joule) == "2.77778E-7" and one_joule == Decimal("0.000000277778")


def test_pue_and_gpu_hours_add_up():
    model = CostModel(
        currency="CNY", price_per_kwh=Decimal("0.8"), pue=Decimal("1.5"), gpu_price_per_hour=Decimal("2.4")
    )
    # 0.5 kWh × 0.8 × 1.5 = 0.6; 90 s × 2.4 / 3600 = 0.06.
    assert model.cost(energy_j=1_800_000.0, busy_s=90.0, at=NOON_UTC) == Decimal("0.66")
    assert model.cost(energy_j=0.0, busy_s=90.0, at=NOON_UTC) == Decimal("0.06")
    assert model.cost(energy_j=1_800_000, busy_s=0, at=NOON_UTC) == Decimal("0.6")


@pytest.mark.parametrize(
    "at, price",
    [
        (datetime(2026, 1, 1, 8, 0, tzinfo=BEIJING), "1.2"),
        (datetime(2026, 1, 1, 21, 59, 59, 999999, tzinfo=BEIJING), "1.2"),
        (datetime(2026, 1, 1, 22, 0, tzinfo=BEIJING), "0.4"),
        (datetime(2026, 1, 1, 23, 30, tzinfo=BEIJING), "0.4"),
        (datetime(2026, 1, 2, 0, 0, tzinfo=BEIJING), "0.4"),
        (datetime(2026, 1, 2, 7, 59, 59, tzinfo=BEIJING), "0.4"),
        (datetime(2026, 1, 1, 14, 30, tzinfo=UTC), "0.4"),  # 22:30 in Beijing
        (datetime(2026, 1, 1, 13, 59, tzinfo=UTC), "1.2"),  # 21:59 in Beijing
    ],
)
def test_time_of_use_picks_the_local_period_including_one_wrapping_midnight(at, price):
    model = CostModel(currency="CNY", tou=PEAK_OFFPEAK, tz=BEIJING)
    assert model.price_per_kwh_at(at) == Decimal(price)
    assert model.cost(energy_j=7_200_000.0, busy_s=0.0, at=at) == 2 * Decimal(price)


def test_single_period_from_a_time_to_itself_covers_the_whole_day():
    model = CostModel(currency="EUR", tou=[TouPeriod(time(6), time(6), Decimal("0.3"))])
    assert model.price_per_kwh_at(datetime(2026, 1, 1, 5, 59, tzinfo=UTC)) == Decimal("0.3")
    assert model.price_per_kwh_at(datetime(2026, 1, 1, 6, 0, tzinfo=UTC)) == Decimal("0.3")


def test_time_of_use_needs_an_aware_time():
    model = CostModel(currency="CNY", tou=PEAK_OFFPEAK, tz=BEIJING)
    with pytest.raises(ValueError, match="timezone-aware"):
        model.price_per_kwh_at(datetime(2026, 1, 1, 12, 0))


def test_floats_enter_through_their_repr_not_their_binary_expansion():
    # Decimal(0.1) is 0.1000000000000000055511151231257827…: at this price that noise would show
    # up as 0.000000000006 in the result; Decimal(repr(0.1)) is exactly 0.1.
    model = CostModel(currency="USD", price_per_kwh=Decimal("3600000000000"))
    assert model.cost(energy_j=0.1, busy_s=0.0, at=NOON_UTC) == model.cost(
        energy_j=Decimal("0.1"), busy_s=0.0, at=NOON_UTC
    )
    assert str(model.cost(energy_j=0.1, busy_s=0.0, at=NOON_UTC)) == "100000.000000000000"
    gpu = CostModel(currency="USD", price_per_kwh=Decimal("0"), gpu_price_per_hour=Decimal("36000000000000000"))
    assert gpu.cost(energy_j=0.0, busy_s=0.1, at=NOON_UTC) == Decimal("1000000000000")
    small = CostModel(currency="USD", price_per_kwh=Decimal("3.6"))
    assert str(small.cost(energy_j=0.1, busy_s=0.0, at=NOON_UTC)) == "1.00000E-7"


@pytest.mark.parametrize(
    "tou, message",
    [
        (
            [TouPeriod(time(8), time(20), Decimal("1")), TouPeriod(time(22), time(8), Decimal("0.5"))],
            "gap: 20:00:00-22:00:00",
        ),
        (
            [TouPeriod(time(8), time(22), Decimal("1")), TouPeriod(time(21), time(8), Decimal("0.5"))],
            "overlap: 21:00:00-22:00:00",
        ),
        ([TouPeriod(time(0), time(12), Decimal("1"))], "gap: 12:00:00-24:00:00"),
        ([TouPeriod(time(1), time(0), Decimal("1"))], "gap: 00:00:00-01:00:00"),
    ],
)
def test_time_of_use_must_cover_the_day_once(tou, message):
    with pytest.raises(ValueError, match=message):
        CostModel(currency="CNY", tou=tou)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"currency": "CNY"}, "exactly one"),
        ({"currency": "CNY", "price_per_kwh": Decimal("1"), "tou": PEAK_OFFPEAK}, "exactly one"),
        ({"currency": "cny", "price_per_kwh": Decimal("1")}, "3 uppercase"),
        ({"currency": "CNY", "price_per_kwh": Decimal("-0.1")}, "price_per_kwh"),
        ({"currency": "CNY", "price_per_kwh": 0.6}, "price_per_kwh"),
        ({"currency": "CNY", "price_per_kwh": Decimal("1"), "pue": Decimal("0.9")}, "pue"),
        ({"currency": "CNY", "price_per_kwh": Decimal("1"), "gpu_price_per_hour": Decimal("-1")}, "gpu_price"),
    ],
)
def test_invalid_models_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostModel(**kwargs)


def test_negative_or_non_finite_usage_is_rejected():
    model = CostModel(currency="CNY", price_per_kwh=Decimal("1"))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="energy_j"):
            model.cost(energy_j=bad, busy_s=0.0, at=NOON_UTC)


def test_money_json_never_uses_an_exponent():
    tiny = CostModel(currency="CNY", price_per_kwh=Decimal("1")).cost(energy_j=0.00036, busy_s=0.0, at=NOON_UTC)
    assert tiny == Decimal("1E-10")
    assert money_json(tiny, "CNY") == {"amount": "0.000000000100", "currency": "CNY"}
    assert money_json(Decimal("1E+3"), "USD") == {"amount": "1000", "currency": "USD"}


def test_describe_gives_prices_as_strings():
    model = CostModel(currency="CNY", tou=PEAK_OFFPEAK, pue=Decimal("1.3"), tz=BEIJING)
    assert model.describe() == {
        "currency": "CNY",
        "price_per_kwh": None,
        "tou": [
            {"start": "08:00:00", "end": "22:00:00", "price_per_kwh": "1.2"},
            {"start": "22:00:00", "end": "08:00:00", "price_per_kwh": "0.4"},
        ],
        "pue": "1.3",
        "gpu_price_per_hour": "0",
        "tz": "UTC+08:00",
    }
