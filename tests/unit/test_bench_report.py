"""report.html: self-contained (no network references), every plot as inline SVG, energy figures
tagged with their source, the simulated banner exactly when simulated, failures escaped, and
well-formed HTML that degrades to "—" and notes when data is missing."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import pytest

from factory.bench import svg
from factory.bench.report import SIM_BANNER, render_report, write_report
from factory.bench.report_plots import CDF_MAX_POINTS, level_cdf, power_series

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Collects tags and attributes and checks that every opened element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def parse(html: str) -> _Checker:
    checker = _Checker()
    checker.feed(html)
    checker.close()
    return checker


def dist(p50_s: float, p99_s: float, n: int = 3) -> dict:
    return {"n": n, "mean": p50_s, "p50": p50_s, "p90": p99_s * 0.9, "p95": p99_s * 0.95, "p99": p99_s}


def agg(completed: int, failed: int, out_tok_s: float, ttft_s: float, j_per_tok: float | None, source: str) -> dict:
    energy = (
        None
        if j_per_tok is None
        else {
            "energy_j": 100.0,
            "duration_s": 2.0,
            "j_per_tok": j_per_tok,
            "tok_per_j": 1 / j_per_tok,
            "mean_power_w": 50.0,
            "output_tok": 200,
        }
    )
    return {
        "completed": completed,
        "failed": failed,
        "duration_s": 2.0,
        "output_tok": 200,
        "input_tok": 300,
        "output_tok_s": out_tok_s,
        "total_tok_s": out_tok_s * 2.5,
        "request_s": completed / 2.0,
        "goodput_req_s": None,
        "slo_attained": None,
        "ttft_s": dist(ttft_s, ttft_s * 3),
        "tpot_s": dist(0.02, 0.05),
        "itl_s": dist(0.02, 0.06),
        "e2e_s": dist(0.5, 1.2),
        "energy": {"source": source, "whole": energy, "steady": copy.deepcopy(energy)},
        "cost": {"per_million_output_tok": 1.25, "gpu_part": 1.0, "energy_part": 0.25},
    }


def record(index: int, t_send_s: float, chunk_s: list[float], n_out: int) -> dict:
    return {
        "index": index,
        "t_send_s": t_send_s,
        "chunk_s": chunk_s,
        "n_in": 100,
        "n_out": n_out,
        "n_out_source": "usage",
        "n_out_expected": n_out,
    }


def make_result(simulated: bool = False) -> dict:
    level1 = {
        "load": {"mode": "concurrency", "value": 1},
        "t0_unix": 1_700_000_000.0,
        "requests": [record(0, 0.0, [0.1, 0.12, 0.15], 3), record(1, 0.2, [0.3, 0.35], 2), record(2, 0.5, [0.2], 1)],
        "failures": [],
        "steady": {"start_s": 0.0, "end_s": 0.5},
        "energy_samples": [[0.0, 0.0], [1.0, 60.0], [2.0, 100.0]],
        "power_samples": [[0.5, 60.0], [1.5, 40.0]],
        "energy_source": "nvml:measured",
        "gpus": 1,
        "aggregates": agg(3, 0, 100.0, 0.12, 0.5, "nvml:measured"),
    }
    level2 = {
        "load": {"mode": "concurrency", "value": 4},
        "t0_unix": 1_700_000_010.0,
        "requests": [record(0, 0.0, [0.3, 0.4, 0.5, 0.6], 4), record(2, 0.1, [0.25, 0.3], 2)],
        "failures": [{"index": 1, "t_send_s": 0.05, "status": 500, "error": "<b>boom</b> & co"}],
        "steady": {"start_s": 0.1, "end_s": 0.2},
        "energy_samples": [[0.0, 0.0], [1.0, 120.0], [3.0, 520.0]],  # no power samples: derived
        "power_samples": [],
        "energy_source": "server:modeled",
        "gpus": 1,
        "aggregates": agg(2, 1, 300.0, 0.3, 0.75, "server:modeled"),
    }
    return {
        "schema": "factory.bench-result/1",
        "kind": "sim" if simulated else "run",
        "simulated": simulated,
        "label": "factory <test>",
        "created_unix": 1_700_000_000.0,
        "config": {
            "url": "http://127.0.0.1:8000/v1",
            "model": "tiny",
            "dataset": "random",
            "load": {"mode": "concurrency", "levels": [1, 4], "burstiness": 1.0},
            "slo": {"ttft_s": None, "tpot_s": None, "e2e_s": None},
            "energy": "auto",
            "prices": {"gpu_price_hour": 2.0, "kwh_price": 0.1, "pue": 1.2, "gpus": 1},
        },
        "environment": {"host": "box", "cpus": 16, "python": "3.11", "gpus": ["H100"]},
        "definitions": ["TTFT = arrival of the first streamed chunk with non-empty content − t_send."],
        "levels": [level1, level2],
    }


def summary_row(html: str, label: str) -> str:
    match = re.search(rf"<tr><td class=k>{re.escape(label)}</td>(.*?)</tr>", html)
    assert match, f"no summary row for {label}"
    return match.group(1)


def test_report_is_self_contained_and_well_formed(tmp_path):
    path = write_report(make_result(), tmp_path / "out" / "report.html")
    assert path.exists() and path.name == "report.html"
    html = path.read_text(encoding="utf-8")
    checker = parse(html)
    assert checker.errors == [] and checker.stack == []
    for tag, attrs in checker.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I), f"<{tag} {name}={value}>"
        assert tag != "script" or "src" not in attrs
        assert not (tag == "link" and "stylesheet" in (attrs.get("rel") or ""))
    assert "@import" not in html and not re.search(r"url\(\s*['\"]?(https?:)?//", html)
    # The config's URL is shown as text only, escaped, never as a link.
    assert "http://127.0.0.1:8000/v1" in html and "<a " not in html


def test_write_report_into_a_directory_names_the_file(tmp_path):
    path = write_report(make_result(), tmp_path)
    assert path == tmp_path / "report.html" and path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_every_plot_kind_is_an_inline_svg():
    html = render_report(make_result())
    titles = [
        "Throughput vs latency",
        "Energy per output token vs load",
        "GPU power over time",
        "TTFT distribution",
        "TPOT distribution",
    ]
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    for title in titles:
        assert any(f"<title>{title}</title>" in s for s in svgs), title
    assert all("<path" in s or "<circle" in s for s in svgs)
    assert "<script" not in html


def test_level_labels_and_summary_figures_appear():
    html = render_report(make_result())
    row1, row4 = summary_row(html, "c=1"), summary_row(html, "c=4")
    assert "<td>100</td>" in row1 and "<td>300</td>" in row4  # output tok/s
    assert "<td>120</td>" in row1  # TTFT p50 0.12 s shown in ms
    assert "&lt;b&gt;" not in row1 and "factory &lt;test&gt;" in html


def test_energy_figures_carry_their_source():
    html = render_report(make_result())
    row1, row4 = summary_row(html, "c=1"), summary_row(html, "c=4")
    assert '<td>0.5<span class="src">[nvml:measured]</span></td>' in row1  # J/tok whole
    assert '<td>0.75<span class="src">[server:modeled]</span></td>' in row4
    assert row1.count("[nvml:measured]") == 5 and "[server:modeled]" not in row1  # 4 energy figures + cost
    assert "source: nvml:measured, server:modeled" in html  # J/token plot caption


def test_no_energy_prints_dashes_and_skips_the_energy_plots():
    result = make_result()
    for level in result["levels"]:
        level.update(energy_source="none", energy_samples=[], power_samples=[])
        level["aggregates"]["energy"] = {"source": "none", "whole": None, "steady": None}
        level["aggregates"]["cost"] = None
    html = render_report(result)
    row = summary_row(html, "c=1")
    assert row.endswith("<td>—</td>" * 5) and 'class="src"' not in row
    assert "J/token plot skipped" in html and "power plot skipped" in html
    assert "<title>TTFT distribution</title>" in html


@pytest.mark.parametrize("simulated", [False, True])
def test_simulated_banner_and_captions_iff_simulated(simulated):
    html = render_report(make_result(simulated=simulated))
    assert (SIM_BANNER in html) is simulated
    captions = re.findall(r"<(?:caption|figcaption)>(.*?)</(?:caption|figcaption)>", html)
    assert len(captions) >= 8
    assert all(("(simulated)" in c) is simulated for c in captions)


def test_failures_are_listed_and_escaped():
    html = render_report(make_result())
    assert "&lt;b&gt;boom&lt;/b&gt; &amp; co" in html and "<b>boom" not in html
    assert re.search(r"<td class=k>c=4</td><td>1</td></tr>", html)  # failed count per level
    assert re.search(r"<td class=k>c=4</td><td>1</td><td>0.05</td><td>500</td>", html)


def test_failures_table_lists_at_most_fifty():
    result = make_result()
    result["levels"][1]["failures"] = [
        {"index": i, "t_send_s": i * 0.01, "status": None, "error": f"err-{i}"} for i in range(70)
    ]
    html = render_report(result)
    assert "err-49<" in html and "err-50<" not in html and "first 50 of 70" in html


def test_cdf_downsamples_large_levels_and_keeps_the_ends():
    values = [(i % 997) / 1000 for i in range(6000)]
    level = {"requests": [record(i, 0.0, [v, v + 0.1], 2) for i, v in enumerate(values)]}
    pts, how = level_cdf(level, "ttft")
    assert how == "thinned" and 2 <= len(pts) <= CDF_MAX_POINTS
    assert pts[0] == (0.0, 1 / 6000) and pts[-1][1] == 1.0 and pts[-1][0] == pytest.approx(996.0)
    assert [y for _, y in pts] == sorted(y for _, y in pts)
    result = make_result()
    result["levels"][1]["requests"] = level["requests"]
    html = render_report(result)
    assert f"thinned to {CDF_MAX_POINTS} points above 5000 requests" in html
    ttft_svg = re.search(r"<svg\b(?:(?!</svg>).)*<title>TTFT distribution</title>.*?</svg>", html, re.S).group(0)
    # Step path: a start at zero plus two vertices per point, never one per record.
    assert max(len(re.findall(r"[ML][\d.-]+,", d)) for d in re.findall(r' d="([^"]+)"', ttft_svg)) <= 2 * CDF_MAX_POINTS
    small, how = level_cdf({"requests": level["requests"][:100]}, "tpot")
    assert how == "records" and len(small) == 100 and small[0][0] == pytest.approx(100.0)  # 0.1 s gap, ms


def test_tpot_cdf_skips_single_token_requests():
    pts, _ = level_cdf(make_result()["levels"][0], "tpot")
    # (0.15 - 0.1) / 2 = 25 ms and (0.35 - 0.3) / 1 = 50 ms; the 1-token request has no TPOT.
    assert [round(x, 6) for x, _ in pts] == [25.0, 50.0]


def test_sim_without_records_draws_percentiles_and_gpu_utilisation():
    result = make_result(simulated=True)
    level = result["levels"][0]
    level.update(requests=[], requests_sampled=False, sim={"per_gpu_utilisation": [0.9, 0.45]})
    pts, how = level_cdf(level, "ttft")
    assert how == "percentiles" and [q for _, q in pts] == [0.5, 0.9, 0.95, 0.99]
    assert pts[0][0] == pytest.approx(120.0)
    html = render_report(result)
    assert "<title>Per-GPU utilisation, c=1</title>" in html and ">90%<" in html and ">45%<" in html
    # Level c=4 still has records: the caption names both ways its curves were drawn.
    assert "(from the stored percentiles p50-p99.9 only; from every request) (simulated)" in html


def test_power_is_derived_from_energy_counter_deltas_when_absent():
    assert power_series(make_result()["levels"][1]) == [(0.5, 120.0), (2.0, 200.0)]
    assert power_series(make_result()["levels"][0]) == [(0.5, 60.0), (1.5, 40.0)]
    assert power_series({"energy_samples": [[1.0, 5.0], [1.0, 9.0]]}) == []  # zero-length interval skipped


def test_empty_and_partial_inputs_render():
    for result in ({}, {"levels": [{}]}, {"levels": [{"load": {"mode": "trace", "value": None}, "aggregates": {}}]}):
        html = render_report(result)
        checker = parse(html)
        assert checker.errors == [] and checker.stack == []
        assert "How these figures are defined" in html


def test_comparison_table_marks_rows_within_spread():
    cmp = {
        "labels": {"a": "stock", "b": "factory"},
        "kinds": {"a": "run", "b": "sim"},
        "simulated": True,
        "simulated_sides": {"a": False, "b": True},
        "energy_sources": {"a": "nvml:measured", "b": "sim:modeled"},
        "spread_method": "split-half spread",
        "unmatched": [{"level": "c=16", "only_in": "b"}],
        "rows": [
            {
                "level": "c=1",
                "metric": "output_tok_s",
                "unit": "tok/s",
                "a": 100.0,
                "b": 150.0,
                "ratio": 1.5,
                "spread": 0.05,
                "within_spread": False,
                "better": "higher",
            },
            {
                "level": "c=1",
                "metric": "j_per_tok (whole)",
                "unit": "J/tok",
                "a": 0.5,
                "b": 0.51,
                "ratio": 1.02,
                "spread": 0.1,
                "within_spread": True,
                "better": "lower",
                "source": {"a": "nvml:measured", "b": "sim:modeled"},
            },
        ],
    }
    html = render_report(make_result(), cmp)
    assert "<td>1.500</td><td>5.0%</td><td></td>" in html
    assert "<td>1.020</td><td>10.0%</td><td>~</td>" in html
    assert "~ = difference within the split-half spread" in html
    assert "B = factory (sim; energy source sim:modeled) — SIMULATED" in html
    assert "Comparison, B against A (simulated)" in html and "c=16: only in B" in html
    assert "A nvml:measured / B sim:modeled" in html
    assert parse(html).errors == []


def test_levels_are_named_with_the_shared_load_labels():
    result = make_result()
    result["levels"][0]["load"] = {"mode": "rate", "value": 2.0, "burstiness": 1.0}
    result["levels"][1]["load"] = {"mode": "rate", "value": "inf", "burstiness": 1.0}
    html = render_report(result)
    assert summary_row(html, "rate=2/s") and summary_row(html, "rate=inf")
    assert "<td class=k>c=" not in html  # no level keeps a concurrency name


def test_svg_helpers_escape_text_and_place_ticks():
    chart = svg.line_chart([svg.Series("a<b", [(0, 1), (10, 3)], ["x&y", ""])], "T <1>", "x", "y")
    assert "<title>T &lt;1&gt;</title>" in chart and "a&lt;b" in chart and "x&amp;y" in chart
    assert parse(chart).errors == []
    assert svg.nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert svg.nice_ticks(0, 0.37)[:3] == [0, 0.1, 0.2]
    bars = svg.bar_chart(["g0", "g1"], [0.5, None], "U", "u", y_max=1.0)
    assert bars.count("<rect") == 1
