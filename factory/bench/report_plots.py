"""The plots section of report.html, and the small helpers the rest of the report shares with it.

Every plot is inline SVG built by svg.py from a level's stored aggregates or its records; a plot
with nothing to draw becomes a one-line note instead, so a sparse result still renders.
"""

from __future__ import annotations

from factory.bench import svg
from factory.bench.schema import level_label
from factory.bench.svg import Series, esc

DASH = "—"
CDF_DOWNSAMPLE_ABOVE = 5000  # records; above this a CDF is thinned to CDF_MAX_POINTS
CDF_MAX_POINTS = 500
CDF_SOURCES = {
    "records": "from every request",
    "thinned": f"from requests, thinned to {CDF_MAX_POINTS} points above {CDF_DOWNSAMPLE_ABOVE} requests",
    "percentiles": "from the stored percentiles p50-p99.9 only",
}
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999))


# Helpers report.py uses too; they live here so the import goes one way (report -> report_plots).
def is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def energy_source(level: dict) -> str:
    src = level.get("energy_source") or ((level.get("aggregates") or {}).get("energy") or {}).get("source")
    return DASH if src in (None, "", "none") else str(src)


def get_in(d: dict | None, *keys: str) -> object:
    """d[k1][k2]..., or None where a step is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def sim_caption(text: str, sim: bool) -> str:
    return esc(f"{text} (simulated)" if sim else text)


def _figure(chart: str, caption: str, sim: bool) -> str:
    return f"<figure>{chart}<figcaption>{sim_caption(caption, sim)}</figcaption></figure>"


def note(text: str, sim: bool) -> str:
    return f'<p class="note">{sim_caption(text, sim)}</p>'


def power_series(level: dict) -> list[tuple[float, float]]:
    """power_samples as given, else watts from consecutive energy-counter deltas (at interval midpoints)."""
    if level.get("power_samples"):
        return [(float(t), float(w)) for t, w in level["power_samples"]]
    samples = level.get("energy_samples") or []
    pairs = zip(samples, samples[1:], strict=False)
    return [((t0 + t1) / 2, (e1 - e0) / (t1 - t0)) for (t0, e0), (t1, e1) in pairs if t1 > t0]


def _latency_values(level: dict, which: str) -> list[float]:
    out = []
    for rec in level.get("requests") or []:
        chunks = rec.get("chunk_s") or []
        if not chunks:
            continue
        if which == "ttft":
            out.append(chunks[0])
        elif (rec.get("n_out") or 0) >= 2:
            out.append((chunks[-1] - chunks[0]) / (rec["n_out"] - 1))
    return out


def level_cdf(level: dict, which: str) -> tuple[list[tuple[float, float]], str]:
    """CDF points in ms and how they were made: "records", "thinned" (records, > CDF_DOWNSAMPLE_ABOVE of
    them, cut to CDF_MAX_POINTS) or "percentiles" (the stored DIST, for sim levels without records)."""
    values = _latency_values(level, which)
    if values:
        thin = len(values) > CDF_DOWNSAMPLE_ABOVE
        pts = svg.cdf_points(values, CDF_MAX_POINTS if thin else None)
        return [(x * 1000, y) for x, y in pts], "thinned" if thin else "records"
    d = get_in(level, "aggregates", f"{which}_s") or {}
    pts = [(d[k] * 1000, q) for k, q in PERCENTILES if isinstance(d.get(k), (int, float))]
    return pts, "percentiles"


def _has_points(series: list[Series]) -> bool:
    return any(s.points for s in series)


def _plot_latency(labels: list[str], aggs: list[dict], sim: bool) -> str:
    series: list[Series] = []
    for name, dist, p in (("TTFT p50", "ttft_s", "p50"), ("TTFT p99", "ttft_s", "p99"), ("TPOT p50", "tpot_s", "p50")):
        pts = [(a.get("output_tok_s"), get_in(a, dist, p), lab) for lab, a in zip(labels, aggs, strict=True)]
        pts = [(x, y * 1000, lab) for x, y, lab in pts if is_num(x) and is_num(y)]
        # Only the first series carries the level labels, so they are not printed three times.
        series.append(Series(name, [(x, y) for x, y, _ in pts], [lab if not series else "" for *_, lab in pts]))
    if not _has_points(series):
        return note("No throughput/latency figures to plot.", sim)
    chart = svg.line_chart(series, "Throughput vs latency", "output tok/s", "latency (ms)")
    return _figure(chart, "Latency against output throughput, one point per load level", sim)


def _plot_energy(labels: list[str], levels: list[dict], aggs: list[dict], sim: bool) -> str:
    series = [
        Series(f"J/tok {w}", [(i, v) for i, a in enumerate(aggs) if is_num(v := get_in(a, "energy", w, "j_per_tok"))])
        for w in ("whole", "steady")
    ]
    if not _has_points(series):
        return note("No energy figures: J/token plot skipped.", sim)
    ticks = list(enumerate(labels))
    chart = svg.line_chart(series, "Energy per output token vs load", "load level", "J / output token", x_ticks=ticks)
    sources = ", ".join(sorted({energy_source(lv) for lv in levels}))
    return _figure(chart, f"Joules per output token, whole run and steady state (source: {sources})", sim)


def _plot_power(labels: list[str], levels: list[dict], sim: bool) -> str:
    series = [Series(lab, power_series(lv), markers=False) for lab, lv in zip(labels, levels, strict=True)]
    if not _has_points(series):
        return note("No power or energy samples: power plot skipped.", sim)
    chart = svg.line_chart(series, "GPU power over time", "time since level start (s)", "power (W)")
    return _figure(chart, "Power per level (from power samples, else energy-counter deltas)", sim)


def _plot_cdf(labels: list[str], levels: list[dict], which: str, sim: bool) -> str:
    name = which.upper()
    cdfs = [(lab, *level_cdf(lv, which)) for lab, lv in zip(labels, levels, strict=True)]
    # Percentile points are few and not a step function: markers joined by lines.
    series = [Series(lab, pts, markers=how == "percentiles", step=how != "percentiles") for lab, pts, how in cdfs]
    if not _has_points(series):
        return note(f"No {name} values to plot.", sim)
    chart = svg.cdf_chart(series, f"{name} distribution", f"{name} (ms)")
    hows = "; ".join(CDF_SOURCES[how] for how in sorted({how for lab, pts, how in cdfs if pts}))
    return _figure(chart, f"Empirical CDF of {name} per level ({hows})", sim)


def _plot_utilisation(label: str, level: dict, sim: bool) -> str:
    util = get_in(level, "sim", "per_gpu_utilisation")
    if not (isinstance(util, list) and util):
        return ""
    gpus = [f"GPU {i}" for i in range(len(util))]
    chart = svg.bar_chart(gpus, util, f"Per-GPU utilisation, {label}", "utilisation", y_max=1.0, value_fmt=_pct)
    return _figure(chart, f"Busy fraction of each GPU at {label}", sim)


def plots_section(levels: list[dict], sim: bool) -> str:
    labels = [level_label(lv.get("load")) for lv in levels]
    aggs = [lv.get("aggregates") or {} for lv in levels]
    parts = [
        _plot_latency(labels, aggs, sim),
        _plot_energy(labels, levels, aggs, sim),
        _plot_power(labels, levels, sim),
        _plot_cdf(labels, levels, "ttft", sim),
        _plot_cdf(labels, levels, "tpot", sim),
        *(_plot_utilisation(lab, lv, sim) for lab, lv in zip(labels, levels, strict=True)),
    ]
    return "\n".join(p for p in parts if p)
