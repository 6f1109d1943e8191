"""The cluster simulator (factory/sim/): calibrated to its profile, driving the runtime's own policy
code (choose_batch, rank, ThrottlePolicy), conserving energy, time and tokens, and the CLI's contract."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import factory.policy.batch
import factory.policy.routing
import factory.policy.throttle
import factory.routing.stats
from factory.bench import metrics, schema
from factory.config import PROFILES_DIR
from factory.policy.batch import Slo
from factory.policy.profile import load_profile
from factory.policy.routing import Balance, rank
from factory.policy.throttle import Budgets
from factory.sim import cluster, output, route, workload
from factory.sim.cli import main
from factory.sim.cluster import SimConfig

PUBLISHED = load_profile(PROFILES_DIR / "h100-sxm-llama-3.1-8b.published.json")
MEASURED = load_profile(PROFILES_DIR / "h100-sxm-llama-3.1-8b.measured.json")


def saturating(profile, batch: int, seconds: float, *, output_len: int = 64, input_len: int = 128, gpus: int = 1):
    """Poisson arrivals at 3x what `gpus` GPUs at `batch` can serve."""
    rate = 3.0 * gpus * profile.tok_s(batch) / output_len
    return workload.synthetic(
        "poisson", duration_s=seconds, rate_req_s=rate, input_len=input_len, output_len=output_len, seed=7, cohort=1
    )


def steady_figures(gpu, batch: int) -> tuple[float, float]:
    """(tok/s, J/token) over the busy steady window of one GPU's segment log: from the first step at
    the full batch to the last one (ramp and drain excluded, everything in between included)."""
    log = gpu.log
    full = [i for i, s in enumerate(log) if s[3] == batch]
    window = log[full[0] : full[-1] + 1]
    seconds = sum(s[1] - s[0] for s in window)
    energy_j = sum(s[4] for s in window)
    tokens = sum(s[5] for s in window)
    assert seconds > 20  # a long steady state, not a few steps
    return tokens / seconds, energy_j / tokens


# --- validation against the profile ---


@pytest.mark.parametrize(("profile", "batch"), [(PUBLISHED, 8), (PUBLISHED, 64), (PUBLISHED, 256), (MEASURED, 64)])
def test_stock_at_saturation_reproduces_the_profile_within_5_percent(profile, batch):
    seconds = 30.0 if batch < 256 else 12.0
    run = cluster.run(
        profile,
        saturating(profile, batch, seconds),
        SimConfig(gpus=1, policy="stock", max_num_seqs=batch, record_segments=True),
    )
    tok_s, j_per_tok = steady_figures(run.gpus[0], batch)
    point = next(p for p in profile.decode_curve() if p.batch == batch)
    assert tok_s == pytest.approx(point.tok_s, rel=0.05)
    assert j_per_tok == pytest.approx(point.j_per_tok, rel=0.05)


# --- the sim drives the runtime's policy code ---


def test_the_sim_binds_the_policy_functions_themselves():
    assert cluster.choose_batch is factory.policy.batch.choose_batch
    assert cluster.EnergyCurve is factory.policy.batch.EnergyCurve
    assert cluster.ThrottlePolicy is factory.policy.throttle.ThrottlePolicy
    assert cluster.routing_stats is factory.routing.stats.routing_stats
    assert route.rank is factory.policy.routing.rank
    assert route.replica_view is factory.routing.stats.replica_view
    assert route.PrefixIndex is factory.policy.routing.PrefixIndex


def test_choose_batch_decides_the_simulated_batch(monkeypatch):
    calls = []

    def capped(curve, slo, **kw):
        calls.append(kw)
        d = factory.policy.batch.choose_batch(curve, slo, **kw)
        return type(d)(4, d.token_budget, d.duty, d.predicted_power_w, d.predicted_j_per_tok, "test cap")

    monkeypatch.setattr(cluster, "choose_batch", capped)
    run = cluster.run(PUBLISHED, saturating(PUBLISHED, 64, 5.0), SimConfig(gpus=1, policy="factory"))
    assert calls and all(c["max_num_seqs"] == 256 for c in calls)
    g = run.gpus[0]
    assert g.tokens / g.steps <= 4.0 + 1e-9


def test_rank_decides_where_requests_go(monkeypatch):
    work = workload.synthetic("poisson", duration_s=5, rate_req_s=20, input_len=64, output_len=16, seed=1)
    real = cluster.run(PUBLISHED, work, SimConfig(gpus=4, policy="factory"))
    assert [g.completed for g in real.gpus] == [len(work), 0, 0, 0]  # rank fills one GPU before waking another
    chosen = []

    def least_loaded(views, depth, balance=None):  # not the policy: spreads instead of filling
        order = [v.id for v in sorted(views, key=lambda v: (v.load, v.id))]
        chosen.append(order[0])
        return order

    monkeypatch.setattr(route, "rank", least_loaded)
    run = cluster.run(PUBLISHED, work, SimConfig(gpus=4, policy="factory"))
    assert len(chosen) == len(work)
    assert [g.completed for g in run.gpus] == [chosen.count(i) for i in route.replica_ids(4)]
    assert max(g.completed for g in run.gpus) < len(work) / 2


def test_a_tight_tpot_slo_caps_the_batch_and_is_met_where_stock_misses_it():
    slo = Slo(None, 0.025)  # 25 ms: 128 fits (18 ms x 1.25), 256 does not (28 ms)
    curve = factory.policy.batch.EnergyCurve.from_profile(PUBLISHED, max_batch=256, idle_w=100, busy_w=691)
    cap = factory.policy.batch.choose_batch(curve, slo, max_num_seqs=256, max_num_batched_tokens=8192).batch_cap
    assert cap < 256
    work = saturating(PUBLISHED, 256, 10.0)
    p99 = {}
    for policy in ("stock", "factory"):
        run = cluster.run(PUBLISHED, work, SimConfig(gpus=1, policy=policy, slo=slo))
        agg, _ = output.aggregates(run, {"tpot_s": 0.025}, {})
        p99[policy] = agg["tpot_s"]["p99"]
        if policy == "factory":
            g = run.gpus[0]
            assert g.tokens / g.steps <= cap
    assert p99["factory"] <= 0.025 < p99["stock"]


def test_pruned_ranking_picks_what_rank_over_every_view_picks():
    rnd = random.Random(3)
    ids = route.replica_ids(12)
    for trial in range(300):
        r = route.FleetRouter(ids)
        for i in range(12):
            control = {
                "batch_cap": rnd.choice([None, 8, 16]),
                "efficient_batch": rnd.choice([None, 8, 16]),
                "throttle_level": rnd.choice([0, 0, 0, 1]),
            }
            r.publish(
                i,
                factory.routing.stats.routing_stats(
                    model="sim",
                    running=rnd.choice([0, 4, 8, 16]),
                    waiting=rnd.choice([0, 0, 2]),
                    max_num_seqs=16,
                    control=control,
                ),
            )
            r.set_ongoing(i, rnd.choice([0, 3, 8, 17]))
        prefix = -1
        depth: dict[str, int] = {}
        if trial % 2:
            prefix = 0
            hashes = r._prefix_hashes(0)
            for holder in rnd.sample(ids, rnd.randint(1, 3)):
                r.index.record(hashes[: rnd.randint(1, len(hashes))], holder, 0.0)
            depth = r.index.matches(hashes, ids, 0.0)
        expected = rank(list(r.views), depth, Balance())[0]
        assert ids[r.route(prefix, 0.0)] == expected


# --- fleet behaviour and conservation ---


def test_at_low_load_the_factory_packs_work_onto_fewer_gpus_for_fewer_joules():
    work = workload.synthetic(
        "poisson", duration_s=120, rate_req_s=0.1 * 8 * 9010 / 256, input_len=512, output_len=256, seed=2
    )
    busy, j_per_tok = {}, {}
    for policy in ("stock", "factory"):
        run = cluster.run(PUBLISHED, work, SimConfig(gpus=8, policy=policy, slo=Slo(2.0, 0.1)))
        busy[policy] = sum(g.busy_s / run.end_s > 0.05 for g in run.gpus)
        agg, _ = output.aggregates(run, {}, {})
        j_per_tok[policy] = agg["energy"]["whole"]["j_per_tok"]  # idle GPUs' energy included
    assert busy["factory"] < busy["stock"] == 8
    assert j_per_tok["factory"] < 0.8 * j_per_tok["stock"]


@pytest.mark.parametrize("policy", ["stock", "factory"])
def test_energy_time_and_tokens_are_conserved_even_with_preemption(policy):
    work = workload.synthetic("poisson", duration_s=10, rate_req_s=150, input_len=256, output_len=128, seed=5, cohort=2)
    run = cluster.run(PUBLISHED, work, SimConfig(gpus=2, policy=policy, kv_tokens=20_000))
    total_j = run.samples[-1][1]
    assert total_j == pytest.approx(sum(g.busy_j + g.idle_j + g.pause_j for g in run.gpus), rel=1e-9)
    for g in run.gpus:
        assert g.busy_s + g.pause_s_total + g.idle_s == pytest.approx(run.end_s, rel=1e-9)
    assert all(e >= 0 for e in run.req.e2e_s)  # everything completed
    assert int(work.output_tok.sum()) * work.cohort == sum(g.tokens for g in run.gpus)
    if policy == "stock":
        assert sum(g.preemptions for g in run.gpus) > 0  # the KV cache is small enough to overflow


def test_the_factorys_kv_aware_admission_preempts_less_than_stock():
    work = workload.synthetic("poisson", duration_s=10, rate_req_s=150, input_len=256, output_len=128, seed=5)
    preempted = {
        p: sum(g.preemptions for g in cluster.run(PUBLISHED, work, SimConfig(gpus=2, policy=p, kv_tokens=20_000)).gpus)
        for p in ("stock", "factory")
    }
    assert preempted["factory"] < preempted["stock"] / 2


def test_a_site_budget_holds_the_fleets_mean_power():
    work = saturating(PUBLISHED, 256, 30.0, gpus=2)
    free = cluster.run(PUBLISHED, work, SimConfig(gpus=2, policy="factory"))
    budget_w = 1000.0
    capped = cluster.run(PUBLISHED, work, SimConfig(gpus=2, policy="factory", budgets=Budgets(site_w=budget_w)))
    mean_w = [r.samples[-1][1] / r.end_s for r in (free, capped)]
    assert mean_w[0] > 1.2 * budget_w  # unthrottled, the fleet draws well above the budget
    assert mean_w[1] <= 1.05 * budget_w
    assert capped.governor_steps > 0 and sum(g.pause_j for g in capped.gpus) > 0


def test_shed_low_class_requests_fail_with_the_budget_error_and_prefixes_are_tracked(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [
        {
            "t_s": i * 0.01,
            "input_tok": 400,
            "output_tok": 200,
            "prefix": f"doc-{i % 3}",
            "class": "low" if i % 2 else "standard",
        }
        for i in range(3000)
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    work = workload.from_file(str(trace))
    run = cluster.run(PUBLISHED, work, SimConfig(gpus=2, policy="factory", budgets=Budgets(site_w=300.0)))
    assert run.max_level == 3 and run.shed and all(work.cls[i] == 2 for i in run.shed)
    failures, total = output._failures(run)
    assert total >= len(run.shed) and failures[0]["error"] == output.SHED_ERROR
    assert run.prefixed == len(work) - len(run.shed) and run.prefix_hits > 0.9 * run.prefixed


# --- workload and metrics helpers ---


def test_diurnal_rate_has_its_trough_at_the_ends_and_averages_the_rate_asked():
    work = workload.synthetic("diurnal", duration_s=1000, rate_req_s=200, input_len=8, output_len=8, seed=1)
    assert len(work) / 1000 == pytest.approx(200, rel=0.02)
    counts, _ = np.histogram(work.t_s, bins=20, range=(0, 1000))
    assert counts[0] < 0.25 * counts[10] and counts[-1] < 0.25 * counts[9]
    assert workload.auto_cohort(1_500_000) == 1 and workload.auto_cohort(4_050_000) == 3


def test_weighted_dist_is_metrics_dist_of_the_repeated_values():
    rnd = np.random.default_rng(0)
    values = rnd.exponential(1.0, 700)
    counts = rnd.integers(0, 4, 700)
    expanded = np.repeat(values, counts).tolist()
    got, want = output.weighted_dist(values, counts), metrics.dist(expanded)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12)


# --- the command ---


def test_cli_writes_both_policies_a_comparison_and_labels_everything_simulated(tmp_path, capsys):
    rc = main(["--gpus", "2", "--duration", "30s", "--policy", "stock,factory", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "SIMULATED side by side" in printed
    for policy in ("stock", "factory"):
        result = schema.load(tmp_path / policy)
        assert result["kind"] == "sim" and result["simulated"] is True and result["label"] == f"sim {policy}"
        level = result["levels"][0]
        assert level["energy_source"] == "sim:modeled" and level["requests_sampled"] is False
        assert level["sim"]["notes"] and level["aggregates"]["completed"] > 0
        assert (tmp_path / policy / "report.html").is_file()
    assert (tmp_path / "comparison.json").is_file()


def test_cli_replays_a_trace_file_through_one_policy(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"t_s": i * 0.05, "input_tok": 300, "output_tok": 50}) for i in range(200)))
    assert main(["--trace", str(trace), "--gpus", "2", "--policy", "factory", "--out", str(tmp_path / "o")]) == 0
    result = schema.load(tmp_path / "o")
    agg = result["levels"][0]["aggregates"]
    assert agg["completed"] == 200 and agg["output_tok"] == 200 * 50
    assert result["levels"][0]["sim"]["trace"]["kind"] == "file" and (tmp_path / "o" / "report.html").is_file()
    assert "SIMULATED (sim factory)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "no-such-card"], "unknown profile 'no-such-card'"),
        (["--duration", "an hour"], "duration 'an hour': expected a positive time"),
        (["--slo", "ttft=fast"], "--slo ttft 'fast': expected a positive time"),
        (["--slo", "latency=2s"], "--slo 'latency=2s': expected ttft=, tpot= or e2e="),
        (["--budget", "site=30mW"], "bad budget"),
        (["--trace", "/no/such/file.jsonl"], "is not poisson, diurnal or a file"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, tmp_path, capsys):
    try:
        rc = main([*argv, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown profile" in message:
        assert "h100-sxm-llama-3.1-8b.published" in err  # lists what is available
