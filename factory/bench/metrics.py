"""The benchmark's metrics, exactly as shared/reference/METRICS.md defines them. Pure, stdlib only.

Times are seconds relative to the level's t0 (`_s`); a RECORD's `chunk_s` are relative to its own
`t_send_s`. Energy counters are joules (`_j`), power watts (`_w`), tokens `_tok`. The dict shapes
(RECORD, LEVEL, DIST, AGG) are the result.json contract in docs/result-schema.md.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

DEFINITIONS: list[str] = [
    "t_send: monotonic clock read immediately before the request is sent.",
    "TTFT = arrival of the first streamed chunk with non-empty content - t_send.",
    "E2E latency = arrival of the last content chunk - t_send (the usage chunk and [DONE] do not count).",
    "N_out = the server's usage.completion_tokens; if absent, the answer retokenised with --tokenizer "
    "(else its content chunks counted), the source kept per request; never max_tokens.",
    "TPOT (per request) = (E2E - TTFT) / (N_out - 1), only for N_out >= 2.",
    "ITL = the gaps between consecutive content chunks, pooled over requests (never includes TTFT).",
    "Duration T = last response received - first request sent (failed requests included).",
    "Output throughput = sum N_out / T; total throughput adds prompt tokens; request throughput = completed / T.",
    "Goodput = completed requests meeting every SLO given (TTFT, TPOT, E2E) / T.",
    "Percentiles p50, p90, p95, p99 (p99.9 when n >= 1000), per request, linear interpolation between closest ranks.",
    "Energy E = counter delta over the window, counter linearly interpolated between samples; the source "
    "(NVML board counter, server counter, or modeled) is always printed.",
    "J/token = E / output tokens in the window; tok/J = its inverse; mean power = E / window length. "
    "Whole run = [first send, last response]; steady state = [load at its level, start of drain].",
    "Cost per million output tokens = GPU $/h x GPUs / (3600 x output tok/s) x 1e6 "
    "+ J/token x 1e6 / 3.6e6 x $/kWh x PUE.",
    "Failed requests are counted and listed, never mixed into latency figures.",
]

_PCTS = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of ascending values: linear interpolation between the
    closest ranks, rank = q/100 x (n-1) (numpy's default "linear" method)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def dist(values: Iterable[float]) -> dict:
    """DIST of the values: n, mean and percentiles; {"n": 0} when there are none. Sorts one copy."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        return {"n": 0}
    out = {"n": n, "mean": math.fsum(s) / n}
    for name, q in _PCTS:
        out[name] = percentile(s, q)
    if n >= 1000:  # below that the 99.9th percentile is just the maximum, give or take interpolation
        out["p99.9"] = percentile(s, 99.9)
    return out


def ttft_s(rec: dict) -> float:
    """Time to first content chunk (s)."""
    return rec["chunk_s"][0]


def e2e_s(rec: dict) -> float:
    """Time to the last content chunk (s)."""
    return rec["chunk_s"][-1]


def tpot_s(rec: dict) -> float | None:
    """Time per output token after the first (s/tok); None for N_out < 2 (no second token)."""
    n_out = rec["n_out"]
    if n_out < 2:
        return None
    return (e2e_s(rec) - ttft_s(rec)) / (n_out - 1)


def itls_s(rec: dict) -> list[float]:
    """Gaps between consecutive content chunks (s); the first chunk's wait is TTFT, not an ITL."""
    c = rec["chunk_s"]
    return [c[i] - c[i - 1] for i in range(1, len(c))]


def _streamed(records: Iterable[dict]) -> list[dict]:
    # A completed request without a content chunk has no latency to report; it still counts tokens.
    return [r for r in records if r.get("chunk_s")]


def run_window(records: Sequence[dict], failures: Sequence[dict]) -> tuple[float, float] | None:
    """[first send of any request, failed ones included; last response] (s), or None without responses."""
    done = _streamed(records)
    if not done:
        return None
    start = min(r["t_send_s"] for r in (*records, *failures))
    end = max(r["t_send_s"] + e2e_s(r) for r in done)
    return (start, end) if end > start else None


def steady_window(records: Sequence[dict], failures: Sequence[dict], load: dict) -> tuple[float, float] | None:
    """The steady-state window (s), or None when it is empty.

    Concurrency c: from the c-th send (every worker busy) to the last send (after it in-flight falls).
    Rate and trace: from the first completion (the pipeline is full) to the last send."""
    sends = sorted(r["t_send_s"] for r in (*records, *failures))
    if not sends:
        return None
    if load.get("mode") == "concurrency":
        try:
            c = float(load.get("value"))
        except (TypeError, ValueError):
            c = math.inf
        if not math.isfinite(c) or c < 1 or c > len(sends):
            return None
        start = sends[int(c) - 1]
    else:
        done = _streamed(records)
        if not done:
            return None
        start = min(r["t_send_s"] + e2e_s(r) for r in done)
    end = sends[-1]
    return (start, end) if start < end else None


def counter_at(samples: Sequence[Sequence[float]], t_s: float) -> float | None:
    """The cumulative energy counter (J) at t_s, linearly interpolated between [t_s, counter_j]
    samples (ascending t); None outside the sampled span, where it is unknown."""
    if not samples or t_s < samples[0][0] or t_s > samples[-1][0]:
        return None
    i = bisect_left(samples, t_s, key=lambda s: s[0])
    t1, c1 = samples[i]
    if t1 == t_s or i == 0:
        return float(c1)
    t0, c0 = samples[i - 1]
    return c0 + (c1 - c0) * (t_s - t0) / (t1 - t0)


def energy_between(samples: Sequence[Sequence[float]], a_s: float, b_s: float) -> float | None:
    """Energy (J) over [a_s, b_s]: counter(b) - counter(a); None if either end is outside the samples."""
    ca = counter_at(samples, a_s)
    cb = counter_at(samples, b_s)
    if ca is None or cb is None:
        return None
    return cb - ca


def tokens_between(records: Iterable[dict], a_s: float, b_s: float) -> float:
    """Output tokens produced inside [a_s, b_s]: each request's N_out spread evenly over its content
    chunks, each chunk counted at its arrival time (tok, fractional)."""
    total = 0.0
    for r in _streamed(records):
        t_send, chunks = r["t_send_s"], r["chunk_s"]
        inside = sum(1 for c in chunks if a_s <= t_send + c <= b_s)
        if inside:
            total += r["n_out"] * inside / len(chunks)
    return total


def energy_summary(energy_j: float, duration_s: float, output_tok: float) -> dict:
    """The "whole"/"steady" energy dict: J, s, J/tok, tok/J, W and tokens; ratios None when undefined."""
    return {
        "energy_j": energy_j,
        "duration_s": duration_s,
        "j_per_tok": energy_j / output_tok if output_tok > 0 else None,
        "tok_per_j": output_tok / energy_j if energy_j > 0 else None,
        "mean_power_w": energy_j / duration_s if duration_s > 0 else None,
        "output_tok": output_tok,
    }


def cost(output_tok_s: float, j_per_tok: float | None, prices: dict) -> dict | None:
    """Cost per million output tokens (currency of the prices given, e.g. $).

    gpu part = gpu_price_hour x gpus / (3600 x output_tok_s) x 1e6 (needs a price and throughput);
    energy part = j_per_tok x 1e6 / 3.6e6 x kwh_price x pue (needs a price and energy).
    A missing part is 0; with both missing the cost is None."""
    gpu_price_hour = prices.get("gpu_price_hour")
    kwh_price = prices.get("kwh_price")
    gpus = prices.get("gpus") or 1
    pue = prices.get("pue") or 1.0
    have_gpu = gpu_price_hour is not None and output_tok_s > 0
    have_energy = kwh_price is not None and j_per_tok is not None
    if not (have_gpu or have_energy):
        return None
    gpu_part = gpu_price_hour * gpus / (3600.0 * output_tok_s) * 1e6 if have_gpu else 0.0
    energy_part = j_per_tok * 1e6 / 3.6e6 * kwh_price * pue if have_energy else 0.0
    return {"per_million_output_tok": gpu_part + energy_part, "gpu_part": gpu_part, "energy_part": energy_part}


def meets_slo(rec: dict, slo: dict | None) -> bool:
    """Whether a completed request meets every SLO given (None = not set). N_out < 2 passes TPOT."""
    slo = slo or {}
    if slo.get("ttft_s") is not None and ttft_s(rec) > slo["ttft_s"]:
        return False
    if slo.get("tpot_s") is not None:
        tpot = tpot_s(rec)
        if tpot is not None and tpot > slo["tpot_s"]:
            return False
    if slo.get("e2e_s") is not None and e2e_s(rec) > slo["e2e_s"]:
        return False
    return True


def _energy(
    level: dict, whole: tuple[float, float] | None, steady: tuple[float, float] | None, output_tok: int
) -> dict:
    samples = level.get("energy_samples") or []
    source = level.get("energy_source") or "none"
    if source == "none" or not samples:
        return {"source": "none", "whole": None, "steady": None}
    out = {"source": source, "whole": None, "steady": None}
    if whole is not None:
        e_j = energy_between(samples, *whole)
        if e_j is not None:
            # Every completed token lies inside the whole window, so its count is exact (an int).
            out["whole"] = energy_summary(e_j, whole[1] - whole[0], output_tok)
    if steady is not None:
        e_j = energy_between(samples, *steady)
        if e_j is not None:
            out["steady"] = energy_summary(e_j, steady[1] - steady[0], tokens_between(level["requests"], *steady))
    return out


def aggregate(level: dict, slo: dict | None, prices: dict | None) -> dict:
    """AGG for one LEVEL: counts, throughputs (tok/s, req/s), goodput, latency DISTs (s), energy
    (whole run and steady state) and cost per million output tokens. Uses the level's "steady"
    window when it has that key, else computes it with steady_window."""
    records = level.get("requests") or []
    failures = level.get("failures") or []
    window = run_window(records, failures)
    duration_s = window[1] - window[0] if window else 0.0
    output_tok = sum(r["n_out"] for r in records)
    input_tok = sum(r.get("n_in") or 0 for r in records)

    def per_s(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    streamed = _streamed(records)
    slo = slo or {}
    goodput = attained = None
    if any(slo.get(k) is not None for k in ("ttft_s", "tpot_s", "e2e_s")):
        good = sum(1 for r in streamed if meets_slo(r, slo))
        goodput = per_s(good)
        attained = good / len(records) if records else None

    if "steady" in level:
        s = level["steady"]
        steady = (s["start_s"], s["end_s"]) if s else None
    else:
        steady = steady_window(records, failures, level.get("load") or {})

    output_tok_s = per_s(output_tok)
    energy = _energy(level, window, steady, output_tok)
    prices = dict(prices or {})
    prices["gpus"] = prices.get("gpus") or level.get("gpus") or 1
    j_per_tok = energy["whole"]["j_per_tok"] if energy["whole"] else None
    return {
        "completed": len(records),
        "failed": len(failures),
        "duration_s": duration_s,
        "output_tok": output_tok,
        "input_tok": input_tok,
        "output_tok_s": output_tok_s,
        "total_tok_s": per_s(output_tok + input_tok),
        "request_s": per_s(len(records)),
        "goodput_req_s": goodput,
        "slo_attained": attained,
        "ttft_s": dist(ttft_s(r) for r in streamed),
        "tpot_s": dist(t for t in (tpot_s(r) for r in streamed) if t is not None),
        "itl_s": dist(g for r in streamed for g in itls_s(r)),
        "e2e_s": dist(e2e_s(r) for r in streamed),
        "energy": energy,
        "cost": cost(output_tok_s, j_per_tok, prices),
        "n_out_mismatches": sum(
            1 for r in records if r.get("n_out_expected") is not None and r["n_out"] != r["n_out_expected"]
        ),
    }
