"""Compare two bench results (A, B) level by level: B/A ratios and a run-to-run spread estimate.

One run has no repeats, so its noise is estimated by split-half: the run's completed requests,
in send order, are cut into two halves, every metric is recomputed on each half with the same
metrics functions, and spread = |m1 - m2| / mean(m1, m2). A row's spread is the larger of A's
and B's; a ratio within it (|B/A - 1| < spread) is marked "~": not a difference these runs can show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from factory.bench import metrics
from factory.bench.schema import level_label

LEGEND = "~ = difference smaller than the run-to-run spread (split-half)"

Getter = Callable[[dict], "float | None"]


def _get(*path: str) -> Getter:
    def get(agg: dict) -> float | None:
        v = agg
        for key in path:
            if not isinstance(v, dict):
                return None
            v = v.get(key)
        return v if isinstance(v, (int, float)) else None

    return get


# (metric, unit, better, getter, energy row)
ROWS: list[tuple[str, str, str, Getter, bool]] = [
    ("output_tok_s", "tok/s", "higher", _get("output_tok_s"), False),
    ("total_tok_s", "tok/s", "higher", _get("total_tok_s"), False),
    ("request_s", "req/s", "higher", _get("request_s"), False),
    ("goodput_req_s", "req/s", "higher", _get("goodput_req_s"), False),
    ("ttft_s p50", "s", "lower", _get("ttft_s", "p50"), False),
    ("ttft_s p99", "s", "lower", _get("ttft_s", "p99"), False),
    ("tpot_s p50", "s", "lower", _get("tpot_s", "p50"), False),
    ("tpot_s p99", "s", "lower", _get("tpot_s", "p99"), False),
    ("itl_s p50", "s", "lower", _get("itl_s", "p50"), False),
    ("itl_s p99", "s", "lower", _get("itl_s", "p99"), False),
    ("e2e_s p50", "s", "lower", _get("e2e_s", "p50"), False),
    ("j_per_tok (whole)", "J/tok", "lower", _get("energy", "whole", "j_per_tok"), True),
    ("j_per_tok (steady)", "J/tok", "lower", _get("energy", "steady", "j_per_tok"), True),
    ("tok_per_j (whole)", "tok/J", "higher", _get("energy", "whole", "tok_per_j"), True),
    ("mean_power_w (whole)", "W", "lower", _get("energy", "whole", "mean_power_w"), True),
    ("cost per_million_output_tok", "$/Mtok", "lower", _get("cost", "per_million_output_tok"), False),
]


def _key(load: dict) -> tuple:
    value = load.get("value")
    try:  # 8 and 8.0 and "8" are the same level; "inf" stays comparable as float inf
        value = float(value)
    except (TypeError, ValueError):
        pass
    return (load.get("mode"), value)


def _config(result: dict) -> tuple[dict, dict]:
    config = result.get("config") or {}
    return config.get("slo") or {}, config.get("prices") or {}


def _agg(level: dict, result: dict) -> dict:
    return level.get("aggregates") or metrics.aggregate(level, *_config(result))


def _half_aggs(level: dict, result: dict) -> tuple[dict, dict] | None:
    """AGG of each half of the level's completed requests (by send order); None with < 2 requests.

    Each half is a sub-level recomputed with metrics.aggregate, so its energy is the energy over
    that half's own run window (and steady window) per that half's tokens. Failures go with the
    half whose send span they fall in, so each half's duration still starts at its first send."""
    records = sorted(level.get("requests") or [], key=lambda r: r["t_send_s"])
    if len(records) < 2:
        return None
    slo, prices = _config(result)
    mid = len(records) // 2
    cut_s = records[mid]["t_send_s"]
    failures = level.get("failures") or []
    halves = []
    for part, fails in (
        (records[:mid], [f for f in failures if f["t_send_s"] < cut_s]),
        (records[mid:], [f for f in failures if f["t_send_s"] >= cut_s]),
    ):
        sub = {k: v for k, v in level.items() if k not in ("steady", "aggregates")}
        sub.update(requests=part, failures=fails)
        halves.append(metrics.aggregate(sub, slo, prices))
    return halves[0], halves[1]


def _spread(halves: tuple[dict, dict] | None, get: Getter) -> float | None:
    if halves is None:
        return None
    m1, m2 = get(halves[0]), get(halves[1])
    if m1 is None or m2 is None:
        return None
    mean = (m1 + m2) / 2
    if mean == 0:
        return 0.0 if m1 == m2 else None
    return abs(m1 - m2) / abs(mean)


def _sources(result: dict) -> str:
    found = []
    for level in result.get("levels") or []:
        src = (level.get("aggregates") or {}).get("energy", {}).get("source") or level.get("energy_source") or "none"
        if src not in found:
            found.append(src)
    return ", ".join(found) or "none"


def compare(a: dict, b: dict) -> dict:
    """Rows per matched level and metric: {"level", "metric", "unit", "a", "b", "ratio" (B/A),
    "spread", "within_spread", "better"} (+ "source" on energy rows); unmatched levels are listed."""
    b_levels = {_key(lv["load"]): lv for lv in b.get("levels") or []}
    a_keys = {_key(lv["load"]) for lv in a.get("levels") or []}
    rows, matched, unmatched = [], [], []
    for la in a.get("levels") or []:
        lb = b_levels.get(_key(la["load"]))
        label = level_label(la["load"])
        if lb is None:
            unmatched.append({"level": label, "only_in": "a"})
            continue
        matched.append(label)
        agg_a, agg_b = _agg(la, a), _agg(lb, b)
        halves_a, halves_b = _half_aggs(la, a), _half_aggs(lb, b)
        for metric, unit, better, get, is_energy in ROWS:
            va, vb = get(agg_a), get(agg_b)
            ratio = vb / va if va is not None and vb is not None and va != 0 else None
            spreads = [s for s in (_spread(halves_a, get), _spread(halves_b, get)) if s is not None]
            spread = max(spreads) if spreads else None
            row = {
                "level": label,
                "metric": metric,
                "unit": unit,
                "a": va,
                "b": vb,
                "ratio": ratio,
                "spread": spread,
                "within_spread": None if ratio is None or spread is None else abs(ratio - 1) < spread,
                "better": better,
            }
            if is_energy:
                row["source"] = {"a": agg_a["energy"]["source"], "b": agg_b["energy"]["source"]}
            rows.append(row)
    for lb in b.get("levels") or []:
        if _key(lb["load"]) not in a_keys:
            unmatched.append({"level": level_label(lb["load"]), "only_in": "b"})
    return {
        "labels": {"a": a.get("label"), "b": b.get("label")},
        "kinds": {"a": a.get("kind"), "b": b.get("kind")},
        "simulated": bool(a.get("simulated") or b.get("simulated")),
        "simulated_sides": {"a": bool(a.get("simulated")), "b": bool(b.get("simulated"))},
        "energy_sources": {"a": _sources(a), "b": _sources(b)},
        "spread_method": "split-half: |m1 - m2| / mean(m1, m2) over the two halves of each run by send order",
        "levels": matched,
        "unmatched": unmatched,
        "rows": rows,
    }


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def _cells(cmp: dict) -> tuple[list[str], list[list[str]]]:
    head = ["level", "metric", "unit", "A", "B", "B/A", "spread", "", "energy source"]
    body = []
    for r in cmp["rows"]:
        src = f"A {r['source']['a']} / B {r['source']['b']}" if "source" in r else ""
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
        spread = "n/a" if r["spread"] is None else f"{r['spread']:.1%}"
        body.append(
            [
                r["level"],
                r["metric"],
                r["unit"],
                _num(r["a"]),
                _num(r["b"]),
                ratio,
                spread,
                "~" if r["within_spread"] else "",
                src,
            ]
        )
    return head, body


def _banner(cmp: dict) -> list[str]:
    lab, kinds = cmp["labels"], cmp["kinds"]
    lines = []
    if cmp["simulated"]:
        sides = [s.upper() for s in ("a", "b") if cmp["simulated_sides"][s]]
        lines.append(f"SIMULATED: {' and '.join(sides)} figures are modeled by `factory sim`, not measured")
    lines.append(f"A = {lab['a']} ({kinds['a']}), B = {lab['b']} ({kinds['b']}); B/A > 1 means B is larger")
    lines.append(f"energy source: A {cmp['energy_sources']['a']}; B {cmp['energy_sources']['b']}")
    return lines


def _footer(cmp: dict) -> list[str]:
    lines = [f"unmatched level {u['level']}: only in {u['only_in'].upper()}" for u in cmp["unmatched"]]
    return lines + [LEGEND]


def format_table(cmp: dict) -> str:
    """The comparison as an aligned plain-text table for the terminal."""
    head, body = _cells(cmp)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    right = {3, 4, 5, 6}  # numbers align right

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    table = [line(head), line(["-" * w for w in widths])] + [line(r) for r in body]
    return "\n".join([*_banner(cmp), "", *table, "", *_footer(cmp)]) + "\n"


def format_markdown(cmp: dict) -> str:
    """The comparison as a markdown table (comparison.md)."""
    head, body = _cells(cmp)
    head[7] = "~"
    rows = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i in {3, 4, 5, 6} else "---" for i in range(len(head))) + "|",
    ]
    rows += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    banner = _banner(cmp)
    if cmp["simulated"]:
        banner[0] = f"**{banner[0]}**"
    return "\n\n".join(["# Comparison", *banner, "\n".join(rows), *_footer(cmp)]) + "\n"


def write_comparison(cmp: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/comparison.json and out_dir/comparison.md (creating out_dir); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "comparison.json", out / "comparison.md"
    json_path.write_text(json.dumps(cmp, indent=2) + "\n")
    md_path.write_text(format_markdown(cmp))
    return json_path, md_path
