"""Arrivals for the simulator: when requests come and how long their prompts and answers are.

Three sources, all turned into the same numpy arrays (`Workload`), generated in one go so that
millions of arrivals cost well under a second:

- `poisson`: a constant rate, exponential gaps.
- `diurnal`: a day's shape compressed into the simulated duration: the rate follows a raised
  cosine from a trough at the start and end to a peak in the middle, trough = 0.15 x peak (so
  the mean is 0.575 x peak); Poisson arrivals on it by thinning a peak-rate process.
- a trace file (factory/bench/tracefile.py): times, lengths, prefixes and classes as written.

A cohort of K makes each simulated arrival stand for K identical requests (same time, lengths and
destination), which bounds the simulator's event count on large fleets; rates are divided by K
so the request rate stays what was asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from factory.bench.tracefile import CLASSES, read_trace

LENGTH_SIGMA = 0.6  # lognormal shape of the synthetic prompt and answer lengths
LENGTH_CLIP = 8.0  # lengths are clipped to [1, this x the mean]
TROUGH_SHARE = 0.15  # diurnal: trough rate over peak rate
MAX_AUTO_ARRIVALS = 1_500_000  # `--cohort auto` keeps the simulated arrivals under this
SYNTHETIC = ("poisson", "diurnal")


class WorkloadError(ValueError):
    """A workload that cannot be built (the message says why)."""


@dataclass(frozen=True)
class Workload:
    """Arrivals in time order; index i of every array is one simulated arrival (= `cohort` requests)."""

    kind: str  # "poisson" | "diurnal" | "file"
    t_s: np.ndarray  # float64 arrival times, s from the start
    input_tok: np.ndarray  # int64 prompt lengths
    output_tok: np.ndarray  # int64 answer lengths
    cls: np.ndarray  # int8 index into tracefile.CLASSES ("high", "standard", "low")
    prefix: np.ndarray  # int32 prefix group (index into prefix_names); -1 = no shared prefix
    duration_s: float  # the span arrivals were drawn over
    cohort: int = 1
    rate_req_s: float | None = None  # the mean request rate asked (synthetic traces)
    prefix_names: list[str] = field(default_factory=list)
    source: str = ""  # the trace file, when there is one

    def __len__(self) -> int:
        return len(self.t_s)


def diurnal_rate(t_s: np.ndarray | float, duration_s: float, peak_req_s: float) -> np.ndarray | float:
    """Requests per second at t: trough at 0 and at the end, peak in the middle."""
    shape = (1.0 - np.cos(2.0 * np.pi * np.asarray(t_s) / duration_s)) / 2.0
    return peak_req_s * (TROUGH_SHARE + (1.0 - TROUGH_SHARE) * shape)


def peak_for_mean(mean_req_s: float) -> float:
    """The diurnal peak whose day averages `mean_req_s`."""
    return mean_req_s / (TROUGH_SHARE + (1.0 - TROUGH_SHARE) / 2.0)


def auto_cohort(expected_arrivals: float) -> int:
    """1, or the smallest K that brings the expected arrivals under MAX_AUTO_ARRIVALS."""
    if expected_arrivals <= MAX_AUTO_ARRIVALS:
        return 1
    return int(math.ceil(expected_arrivals / MAX_AUTO_ARRIVALS))


def lengths(rng: np.random.Generator, mean_tok: int, n: int) -> np.ndarray:
    """Lognormal lengths with this mean (sigma LENGTH_SIGMA), rounded, clipped to [1, 8 x mean]."""
    mu = math.log(mean_tok) - LENGTH_SIGMA**2 / 2.0
    x = np.rint(rng.lognormal(mu, LENGTH_SIGMA, n))
    return np.clip(x, 1, max(1, int(LENGTH_CLIP * mean_tok))).astype(np.int64)


def synthetic(
    kind: str,
    *,
    duration_s: float,
    rate_req_s: float,
    input_len: int,
    output_len: int,
    seed: int,
    cohort: int | None = None,
) -> Workload:
    """Poisson or diurnal arrivals at a mean of `rate_req_s` requests/s; cohort None = auto."""
    if kind not in SYNTHETIC:
        raise WorkloadError(f"unknown synthetic trace {kind!r} (poisson, diurnal)")
    if not (rate_req_s > 0 and duration_s > 0):
        raise WorkloadError("the rate and the duration must be > 0")
    k = cohort or auto_cohort(rate_req_s * duration_s)
    rng = np.random.default_rng(seed)
    rate = rate_req_s / k  # arrivals (cohorts) per second
    if kind == "poisson":
        n = int(rng.poisson(rate * duration_s))
        t = np.sort(rng.uniform(0.0, duration_s, n))
    else:  # thinning: a peak-rate Poisson process, each point kept with probability rate(t) / peak
        peak = peak_for_mean(rate)
        n = int(rng.poisson(peak * duration_s))
        t = np.sort(rng.uniform(0.0, duration_s, n))
        t = t[rng.uniform(0.0, 1.0, n) < diurnal_rate(t, duration_s, peak) / peak]
    n = len(t)
    return Workload(
        kind=kind,
        t_s=t,
        input_tok=lengths(rng, input_len, n),
        output_tok=lengths(rng, output_len, n),
        cls=np.full(n, CLASSES.index("standard"), dtype=np.int8),
        prefix=np.full(n, -1, dtype=np.int32),
        duration_s=duration_s,
        cohort=k,
        rate_req_s=rate_req_s,
    )


def from_file(path: str, *, duration_s: float | None = None, cohort: int | None = None) -> Workload:
    """A trace file's requests (those arriving before `duration_s` when given); cohort None = auto.
    Raises tracefile.TraceError on a bad file."""
    entries = read_trace(path)
    if duration_s is not None:
        entries = [e for e in entries if e.t_s < duration_s]
    if not entries:
        raise WorkloadError(f"trace {path}: no requests" + (f" before {duration_s:g} s" if duration_s else ""))
    names: dict[str, int] = {}
    prefix = [-1 if e.prefix is None else names.setdefault(e.prefix, len(names)) for e in entries]
    t = np.array([e.t_s for e in entries], dtype=np.float64)
    span = float(t[-1]) if duration_s is None else duration_s
    return Workload(
        kind="file",
        t_s=t,
        input_tok=np.array([e.input_tok for e in entries], dtype=np.int64),
        output_tok=np.array([e.output_tok for e in entries], dtype=np.int64),
        cls=np.array([CLASSES.index(e.cls) for e in entries], dtype=np.int8),
        prefix=np.array(prefix, dtype=np.int32),
        duration_s=max(span, float(t[-1])),
        cohort=cohort or auto_cohort(len(entries)),
        prefix_names=list(names),
        source=str(path),
    )
