"""report.html for a bench or sim result: one self-contained page (inline CSS and SVG, no network,
no scripts) with the config, a per-level summary, plots, failures, an optional comparison and the
metric definitions. Figures are read from each level's stored aggregates, never recomputed here,
so the page always agrees with result.json and compare.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from factory.bench.report_plots import DASH, energy_source, get_in, is_num, note, plots_section, sim_caption
from factory.bench.schema import level_label
from factory.bench.svg import esc

SIM_BANNER = "SIMULATED — every figure on this page comes from the simulator, not a measurement"
MAX_FAILURES_LISTED = 50

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555}.banner{background:#b00020;color:#fff;font-weight:700;padding:.8rem 1rem;
border-radius:6px;font-size:1.1rem;margin:1rem 0}
.wrap{overflow-x:auto}table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.88rem}
caption{text-align:left;font-weight:600;padding:.3rem 0;color:#333}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e5e5e5;text-align:right;white-space:nowrap}
th{background:#f3f5f8}td.k,th.k{text-align:left}tbody tr:nth-child(even){background:#fafbfc}
.src{color:#777;font-size:.78em;margin-left:.3em}.note{color:#666;font-style:italic}
svg.chart{max-width:100%;height:auto}
figure{margin:1rem 0 1.6rem}figcaption{color:#444;font-size:.88rem}caption{white-space:nowrap}
.fail td:last-child,.fail th:last-child{text-align:left;white-space:normal}
"""


def fmt(v: object, scale: float = 1.0) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return DASH if v is None else esc(v)
    x = v * scale
    if x != x:  # NaN
        return DASH
    if isinstance(v, int) and scale == 1.0:
        return f"{v:,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def _table(caption: str, head: list[str], rows: list[list[str]], sim: bool, left_cols: int = 1, cls: str = "") -> str:
    """Cells in `rows` are already HTML; head text is escaped here."""
    th = "".join(f"<th{' class=k' if i < left_cols else ''}>{esc(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=k' if i < left_cols else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return (
        f'<div class="wrap"><table{f" class={cls}" if cls else ""}><caption>{sim_caption(caption, sim)}</caption>'
        f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _kv_rows(d: dict, prefix: str = "") -> list[list[str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _kv_rows(v, f"{prefix}{k}.")
        else:
            text = DASH if v is None else ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            rows.append([esc(f"{prefix}{k}"), esc(text)])
    return rows


def _config_tables(result: dict, sim: bool) -> str:
    config = result.get("config") or {}
    keys = ("load", "dataset", "model", "url", "num_requests", "duration_s", "slo", "prices", "energy")
    shown = {k: config[k] for k in keys if k in config}
    shown.update({k: v for k, v in config.items() if k not in shown})
    env = result.get("environment") or {}
    return _table("Configuration", ["key", "value"], _kv_rows(shown), sim, 2) + _table(
        "Environment", ["key", "value"], _kv_rows(env), sim, 2
    )


def _with_src(value: str, src: str) -> str:
    return value if value == DASH else f'{value}<span class="src">[{esc(src)}]</span>'


# (header, dotted path into AGG, scale, is an energy figure): the summary table, left to right.
SUMMARY_COLUMNS = (
    ("completed", "completed", 1, False),
    ("failed", "failed", 1, False),
    ("output tok/s", "output_tok_s", 1, False),
    ("total tok/s", "total_tok_s", 1, False),
    ("req/s", "request_s", 1, False),
    ("goodput req/s", "goodput_req_s", 1, False),
    ("SLO attained %", "slo_attained", 100, False),
    ("TTFT p50 ms", "ttft_s.p50", 1000, False),
    ("TTFT p99 ms", "ttft_s.p99", 1000, False),
    ("TPOT p50 ms", "tpot_s.p50", 1000, False),
    ("TPOT p99 ms", "tpot_s.p99", 1000, False),
    ("ITL p50 ms", "itl_s.p50", 1000, False),
    ("ITL p99 ms", "itl_s.p99", 1000, False),
    ("E2E p50 ms", "e2e_s.p50", 1000, False),
    ("J/tok whole", "energy.whole.j_per_tok", 1, True),
    ("J/tok steady", "energy.steady.j_per_tok", 1, True),
    ("tok/J", "energy.whole.tok_per_j", 1, True),
    ("mean power W", "energy.whole.mean_power_w", 1, True),
)


def _summary_table(levels: list[dict], sim: bool) -> str:
    head = ["level", *(c[0] for c in SUMMARY_COLUMNS), "cost / 1M output tok"]
    rows = []
    for lv in levels:
        a, src = lv.get("aggregates") or {}, energy_source(lv)
        row = [esc(level_label(lv.get("load")))]
        for _, path, scale, energy in SUMMARY_COLUMNS:
            cell = fmt(get_in(a, *path.split(".")), scale)
            row.append(_with_src(cell, src) if energy else cell)
        cost = a.get("cost") or {}
        cell = fmt(cost.get("per_million_output_tok"))
        # The energy share of a price rests on the energy source too.
        rows.append(row + [_with_src(cell, src) if cost.get("energy_part") else cell])
    note = (
        '<p class="note">[source] beside an energy figure names where the energy came from '
        "(server / nvml / sim; measured or modeled). Latencies exclude failed requests.</p>"
    )
    return _table("Summary per load level", head, rows, sim) + note


def _failures(levels: list[dict], sim: bool) -> str:
    counts = [[esc(level_label(lv.get("load"))), fmt(len(lv.get("failures") or []))] for lv in levels]
    listed = [(level_label(lv.get("load")), f) for lv in levels for f in (lv.get("failures") or [])]
    rows = [
        [
            esc(lab),
            fmt(f.get("index")),
            fmt(f.get("t_send_s")),
            fmt(f.get("status")),
            esc(f.get("error", "")),
        ]
        for lab, f in listed[:MAX_FAILURES_LISTED]
    ]
    out = _table("Failed requests per level", ["level", "failed"], counts, sim)
    if rows:
        more = f" (first {MAX_FAILURES_LISTED} of {len(listed)})" if len(listed) > MAX_FAILURES_LISTED else ""
        out += _table(f"Failures{more}", ["level", "index", "t_send_s", "status", "error"], rows, sim, cls="fail")
    return out


def _side(cmp: dict, side: str, key: str, flat: str) -> object:
    """compare.py's flat maps ({"labels": {"a": ..}}) or a per-side dict ({"a": {"label": ..}})."""
    flat_map = cmp.get(flat)
    return flat_map.get(side) if isinstance(flat_map, dict) else get_in(cmp, side, key)


def _comparison(cmp: dict) -> str:
    sims = {s: bool(_side(cmp, s, "simulated", "simulated_sides")) for s in ("a", "b")}
    sim = bool(cmp.get("simulated")) or any(sims.values())
    sides = []
    for s in ("a", "b"):
        label, kind = _side(cmp, s, "label", "labels"), _side(cmp, s, "kind", "kinds")
        energy = _side(cmp, s, "energy_source", "energy_sources")
        flag = " — SIMULATED" if sims[s] else ""
        sides.append(esc(f"{s.upper()} = {label or DASH} ({kind or DASH}; energy source {energy or DASH}){flag}"))
    rows = []
    for r in cmp.get("rows") or []:
        level = level_label(r["level"]) if isinstance(r.get("level"), dict) else str(r.get("level") or DASH)
        ratio, spread, src = r.get("ratio"), r.get("spread"), r.get("source")
        src_text = f"A {src.get('a')} / B {src.get('b')}" if isinstance(src, dict) else ""
        row = [level, r.get("metric") or "", r.get("unit") or ""]
        rows.append(
            [esc(c) for c in row]
            + [fmt(r.get("a")), fmt(r.get("b")), DASH if not is_num(ratio) else f"{ratio:.3f}"]
            + [DASH if not is_num(spread) else f"{spread:.1%}", "~" if r.get("within_spread") else ""]
            + [esc(f"{r['better']} is better" if r.get("better") else DASH), esc(src_text)]
        )
    head = ["level", "metric", "unit", "A", "B", "B/A", "spread", "", "better", "energy source"]
    unmatched = "".join(
        f"<li>{esc(u.get('level'))}: only in {esc(str(u.get('only_in', '')).upper())}</li>"
        for u in cmp.get("unmatched") or []
    )
    method = cmp.get("spread_method") or "run-to-run spread"
    legend = f'<p class="note">B/A &gt; 1 means B is larger. ~ = difference within the {esc(method)}.</p>'
    return (
        f"<p>{'<br>'.join(sides)}</p>"
        + _table("Comparison, B against A", head, rows, sim, 3)
        + legend
        + (f"<p>Unmatched levels:</p><ul>{unmatched}</ul>" if unmatched else "")
    )


def render_report(result: dict, comparison: dict | None = None) -> str:
    sim = bool(result.get("simulated"))
    levels = [lv for lv in (result.get("levels") or []) if isinstance(lv, dict)]
    label, kind = result.get("label") or "bench", result.get("kind") or DASH
    created = result.get("created_unix")
    when = (
        datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(created, (int, float))
        else DASH
    )
    parts = [
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{esc(label)} — bench report</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{esc(label)}</h1><p class=meta>kind: {esc(kind)} · created {esc(when)} · {len(levels)} level(s)</p>",
    ]
    if sim:
        parts.append(f'<div class="banner">{esc(SIM_BANNER)}</div>')
    parts += ["<h2>Configuration and environment</h2>", _config_tables(result, sim)]
    parts += ["<h2>Summary</h2>", _summary_table(levels, sim) if levels else note("No levels.", sim)]
    parts += ["<h2>Plots</h2>", plots_section(levels, sim) if levels else note("Nothing to plot.", sim)]
    parts += ["<h2>Failures</h2>", _failures(levels, sim)]
    if comparison:
        parts += ["<h2>Comparison</h2>", _comparison(comparison)]
    defs = result.get("definitions") or []
    parts.append("<h2>How these figures are defined</h2>")
    parts.append(
        "<ul>" + "".join(f"<li>{esc(d)}</li>" for d in defs) + "</ul>"
        if defs
        else note("No definitions stored in this result.", False)
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(result: dict, path: str | Path, comparison: dict | None = None) -> Path:
    """Write report.html; a directory path gets report.html inside it."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.html"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_report(result, comparison), encoding="utf-8")
    return p
