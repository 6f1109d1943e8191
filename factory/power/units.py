"""Watts as people write them: `800 W`, `30kW`, `1.2 MW` in configs, on the command line and in
the budget API, all turned into one float of watts at the edge so nothing downstream sees a unit.

Only W, kW and MW are accepted. A lowercase `m` would be milli, and a budget a million times too
small (or too large, read the other way) is worse than a refusal, so `mW` is an error, not a guess.
"""

from __future__ import annotations

import math
import re

ACCEPTED_FORMS = "a number of watts or a string such as '800 W', '30 kW' or '1.2 MW' (units W, kW, MW)"

_WATTS = re.compile(r"^\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?:(?P<prefix>[kKM]?)[wW])?\s*$")
_MILLI = re.compile(r"\dm[wW]$")
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6}


def parse_watts(value: int | float | str) -> float:
    """`value` in watts: numbers are W; strings carry W, kW or MW (the unit's case is free except
    that M must be capital). Raises ValueError, naming the accepted forms, unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be {ACCEPTED_FORMS}, got {value!r}")
    if isinstance(value, str):
        match = _WATTS.match(value)
        if match is None:
            milli = " ('mW' would be milliwatts; megawatts are 'MW')" if _MILLI.search("".join(value.split())) else ""
            raise ValueError(f"must be {ACCEPTED_FORMS}, got {value!r}{milli}")
        watts = float(match["number"]) * _SCALE[match["prefix"] or ""]
    else:
        watts = float(value)
    if not math.isfinite(watts) or watts <= 0:
        raise ValueError(f"must be a finite power above 0 W, got {value!r}")
    return watts


def format_watts(watts: float) -> str:
    """For people: the largest of W, kW, MW that keeps the number at least 1 (`30 kW`, `850 W`),
    to three decimals with trailing zeros dropped; parse_watts reads it back."""
    for unit, scale in (("MW", 1e6), ("kW", 1e3)):
        if abs(watts) >= scale:
            return f"{_trim(watts / scale)} {unit}"
    return f"{_trim(watts)} W"


def _trim(number: float) -> str:
    return f"{number:.3f}".rstrip("0").rstrip(".")
