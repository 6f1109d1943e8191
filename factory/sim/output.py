"""A simulator run as a bench result (docs/result-schema.md: "kind": "sim", every figure simulated),
and its one-screen summaries.

The AGG is computed here from the run's arrays rather than by metrics.aggregate over RECORDs:
millions of simulated requests have no streamed chunks to store. The formulas are METRICS.md's,
through factory/bench/metrics.py's functions (dist, counter_at, energy_summary, cost).
"""

from __future__ import annotations

import math

import numpy as np

from factory.bench import metrics, schema
from factory.sim.cluster import SimRun

MAX_FAILURES_LISTED = 1000
SHED_ERROR = "power_budget_exceeded"
KV_ERROR = "kv_capacity_exceeded"  # a request whose prompt + answer exceed one GPU's KV cache


def weighted_dist(values: np.ndarray, counts: np.ndarray) -> dict:
    """metrics.dist of the list in which values[i] appears counts[i] times, without building it:
    the same linear interpolation between closest ranks, located through cumulative counts."""
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    n = int(counts.sum())
    if n == 0:
        return {"n": 0}
    order = np.argsort(values, kind="stable")
    v, ends = values[order], np.cumsum(counts[order])  # the sorted list's ranks [ends[i-1], ends[i])

    def at(rank: int) -> float:
        return float(v[np.searchsorted(ends, rank, side="right")])

    out = {"n": n, "mean": float(np.dot(v, counts[order]) / n)}
    quantiles = [("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0)] + ([("p99.9", 99.9)] if n >= 1000 else [])
    for name, q in quantiles:
        rank = q / 100.0 * (n - 1)
        lo = math.floor(rank)
        hi = min(lo + 1, n - 1)
        out[name] = at(lo) + (at(hi) - at(lo)) * (rank - lo)
    return out


def _dist(values: np.ndarray, cohort: int) -> dict:
    if cohort == 1:
        return metrics.dist(values.tolist())
    return weighted_dist(values, np.full(len(values), cohort, dtype=np.int64))


def aggregates(run: SimRun, slo: dict, prices: dict) -> tuple[dict, dict | None]:
    """(AGG, steady window) of a run; requests of a cohort count `cohort` times everywhere."""
    req, w, K = run.req, run.workload, run.workload.cohort
    t = w.t_s
    ttft, e2e = np.asarray(req.ttft_s), np.asarray(req.e2e_s)
    n_out, n_in = w.output_tok, w.input_tok
    done = e2e >= 0.0
    n_done, n_failed = int(done.sum()), int((ttft == -2.0).sum())
    ends = t[done] + e2e[done]
    start = float(t.min()) if len(t) else 0.0
    end = float(ends.max()) if n_done else start
    duration = end - start

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    out_tok, in_tok = int(n_out[done].sum()) * K, int(n_in[done].sum()) * K
    d_ttft, d_e2e, d_out = ttft[done], e2e[done], n_out[done]
    multi = d_out >= 2
    tpot = (d_e2e[multi] - d_ttft[multi]) / (d_out[multi] - 1)
    goodput = attained = None
    if any(slo.get(k) is not None for k in ("ttft_s", "tpot_s", "e2e_s")):
        ok = np.ones(n_done, dtype=bool)
        if slo.get("ttft_s") is not None:
            ok &= d_ttft <= slo["ttft_s"]
        if slo.get("tpot_s") is not None:
            per_req = np.zeros(n_done)
            per_req[multi] = tpot
            ok &= per_req <= slo["tpot_s"]  # N_out < 2 passes TPOT
        if slo.get("e2e_s") is not None:
            ok &= d_e2e <= slo["e2e_s"]
        good = int(ok.sum())
        goodput, attained = per_s(good * K), (good / n_done if n_done else None)
    itl: dict[float, int] = {}
    for g in run.gpus:
        for gap, c in g.itl.items():
            itl[gap] = itl.get(gap, 0) + c
    energy_samples = [[s[0], s[1]] for s in run.samples]
    token_samples = [[s[0], s[2]] for s in run.samples]
    steady = None
    if n_done and len(t):
        a, b = float(ends.min()), float(t.max())  # trace mode: first completion to last send
        steady = (a, b) if a < b else None
    energy = {"source": "sim:modeled", "whole": None, "steady": None}
    if n_done:
        e_j = metrics.energy_between(energy_samples, start, end)
        if e_j is not None:
            energy["whole"] = metrics.energy_summary(e_j, duration, out_tok)
    if steady is not None:
        e_j = metrics.energy_between(energy_samples, *steady)
        tok = metrics.energy_between(token_samples, *steady)  # the sim's own token counter, same interpolation
        if e_j is not None and tok is not None:
            energy["steady"] = metrics.energy_summary(e_j, steady[1] - steady[0], tok)
    prices = dict(prices)
    prices["gpus"] = prices.get("gpus") or run.config.gpus
    j_per_tok = energy["whole"]["j_per_tok"] if energy["whole"] else None
    agg = {
        "completed": n_done * K,
        "failed": n_failed * K,
        "duration_s": duration,
        "output_tok": out_tok,
        "input_tok": in_tok,
        "output_tok_s": per_s(out_tok),
        "total_tok_s": per_s(out_tok + in_tok),
        "request_s": per_s(n_done * K),
        "goodput_req_s": goodput,
        "slo_attained": attained,
        "ttft_s": _dist(d_ttft, K),
        "tpot_s": _dist(tpot, K),
        "itl_s": weighted_dist(np.fromiter(itl, float, len(itl)), np.fromiter(itl.values(), np.int64, len(itl))),
        "e2e_s": _dist(d_e2e, K),
        "energy": energy,
        "cost": metrics.cost(per_s(out_tok), j_per_tok, prices),
    }
    return agg, ({"start_s": steady[0], "end_s": steady[1]} if steady else None)


def _failures(run: SimRun) -> tuple[list[dict], int]:
    ttft, t = run.req.ttft_s, run.req.t_s
    shed = set(run.shed)
    failed = [i for i, v in enumerate(ttft) if v == -2.0]
    listed = [
        {
            "index": i,
            "t_send_s": t[i],
            "error": SHED_ERROR if i in shed else KV_ERROR,
            "status": 503 if i in shed else None,
        }
        for i in failed[:MAX_FAILURES_LISTED]
    ]
    return listed, len(failed) * run.workload.cohort


def sim_extras(run: SimRun, *, profile_meta: dict, wall_s: float, notes: list[str]) -> dict:
    cfg, gpus, end = run.config, run.gpus, run.end_s
    steps = sum(g.steps for g in gpus)
    return {
        "policy": cfg.policy,
        "profile": profile_meta,
        "trace": {
            "kind": run.workload.kind,
            "source": run.workload.source or None,
            "arrivals": len(run.workload),
            "rate_req_s": run.workload.rate_req_s,
            "duration_s": run.workload.duration_s,
        },
        "cohort": run.workload.cohort,
        "tick_s": cfg.tick_s,
        "decision_s": cfg.decision_s,
        "end_s": end,
        "per_gpu_utilisation": [g.busy_s / end if end > 0 else 0.0 for g in gpus],
        "per_gpu_energy_j": [g.busy_j + g.pause_j + g.idle_j for g in gpus],
        "busy_energy_j": sum(g.busy_j for g in gpus),
        "pause_energy_j": sum(g.pause_j for g in gpus),
        "idle_energy_j": sum(g.idle_j for g in gpus),
        "generated_tok": sum(g.tokens for g in gpus),
        "preemptions": sum(g.preemptions for g in gpus),
        "shed": len(run.shed) * run.workload.cohort,
        "mean_batch": sum(g.tokens for g in gpus) / steps if steps else 0.0,
        "prefix_hit_rate": run.prefix_hits / run.prefixed if run.prefixed else None,
        "decisions": run.decisions,
        "governor_steps": run.governor_steps,
        "max_admission_level": run.max_level,
        "wall_s": wall_s,
        "notes": notes,
    }


def build_result(
    run: SimRun, *, config: dict, slo: dict, prices: dict, profile_meta: dict, wall_s: float, notes: list[str]
) -> dict:
    result = schema.new_result("sim", f"sim {run.config.policy}", config, schema.environment(), simulated=True)
    agg, steady = aggregates(run, slo, prices)
    failures, n_failed = _failures(run)
    samples = run.samples
    power = [
        [samples[i][0], (samples[i][1] - samples[i - 1][1]) / (samples[i][0] - samples[i - 1][0])]
        for i in range(1, len(samples))
        if samples[i][0] > samples[i - 1][0]
    ]
    result["levels"].append(
        {
            "load": {"mode": "trace", "value": None},
            "t0_unix": result["created_unix"],
            "requests": [],
            "requests_sampled": False,
            "failures": failures,
            "failures_total": n_failed,
            "steady": steady,
            "energy_samples": [[s[0], s[1]] for s in samples],
            "power_samples": power,
            "energy_source": "sim:modeled",
            "gpus": run.config.gpus,
            "aggregates": agg,
            "sim": sim_extras(run, profile_meta=profile_meta, wall_s=wall_s, notes=notes),
        }
    )
    return result


# -- summaries -------------------------------------------------------------------------------------


def headline(result: dict) -> dict:
    """The figures the side-by-side compares."""
    level = result["levels"][0]
    agg, sim = level["aggregates"], level["sim"]
    whole = agg["energy"]["whole"] or {}
    util = sim["per_gpu_utilisation"]
    return {
        "output tok/s": agg["output_tok_s"],
        "J/token": whole.get("j_per_tok"),
        "tok/J": whole.get("tok_per_j"),
        "mean power W": whole.get("mean_power_w"),
        "SLO attainment": agg["slo_attained"],
        "TTFT p99 s": agg["ttft_s"].get("p99"),
        "TPOT p99 s": agg["tpot_s"].get("p99"),
        "idle energy kWh": sim["idle_energy_j"] / 3.6e6,
        "mean utilisation": sum(util) / len(util) if util else None,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def summary(result: dict) -> str:
    level = result["levels"][0]
    agg, sim = level["aggregates"], level["sim"]
    p = sim["profile"]
    lines = [
        f"SIMULATED ({result['label']}): {result['config']['gpus']} GPUs, profile {p['stem']} ({p['source']}), "
        f"trace {sim['trace']['kind']}, cohort {sim['cohort']}, {sim['wall_s']:.1f} s wall",
        f"  simulated requests: {agg['completed']:,} completed, {agg['failed']:,} failed "
        f"over {agg['duration_s']:,.0f} s",
    ]
    for name, value in headline(result).items():
        lines.append(f"  simulated {name:<18} {_fmt(value)}")
    lines.append(
        f"  simulated preemptions {sim['preemptions']:,}, mean batch {sim['mean_batch']:.1f}, shed {sim['shed']:,}"
    )
    return "\n".join(lines)


def side_by_side(stock: dict, factory: dict) -> str:
    a, b = headline(stock), headline(factory)
    lines = [f"SIMULATED side by side       {'stock':>14} {'factory':>14} {'factory/stock':>14}"]
    for name in a:
        ratio = b[name] / a[name] if a[name] and b[name] is not None else None
        lines.append(f"  simulated {name:<18} {_fmt(a[name]):>14} {_fmt(b[name]):>14} {_fmt(ratio):>14}")
    return "\n".join(lines)
