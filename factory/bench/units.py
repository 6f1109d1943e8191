"""Times and SLOs as people write them on the command line (`500ms`, `2s`, `30m`, `1h`;
`ttft=500ms,tpot=50ms`), for `factory bench` and `factory sim` alike. Raise ValueError with the
accepted forms; callers turn it into their one-line error."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_SCALE_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
SLO_KEYS = ("ttft_s", "tpot_s", "e2e_s")


def parse_duration_s(text: str, what: str = "duration") -> float:
    """'100ms', '2s', '1.5' (seconds), '30m', '1h' -> seconds, > 0."""
    m = _DURATION.match(str(text))
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"{what} {text!r}: expected a positive time such as 500ms, 2s, 30m or 1h")
    return float(m[1]) * _SCALE_S[m[2]]


def parse_slo(text: str | None, what: str = "--slo") -> dict[str, float | None]:
    """'ttft=500ms,tpot=50ms,e2e=10s' -> {'ttft_s': 0.5, 'tpot_s': 0.05, 'e2e_s': 10.0}; absent: None."""
    slo: dict[str, float | None] = dict.fromkeys(SLO_KEYS)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        key = f"{name.strip().lower()}_s"
        if key not in slo or not value:
            raise ValueError(f"{what} {part!r}: expected ttft=, tpot= or e2e= with a time, e.g. ttft=500ms,tpot=50ms")
        slo[key] = parse_duration_s(value, f"{what} {name.strip()}")
    return slo
