"""Energy profiles: the published H100 profile validates, every validator rule names the field it
rejects, and lookups interpolate in log2(batch), clamp at the ends and pick the nearest context."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from factory.policy.profile import ProfileError, load_profile, parse_profile, validate

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "configs" / "profiles" / "h100-sxm-llama-3.1-8b.published.json"


def point(batch: int, context: int | None = 512, *, phase: str = "decode", step_s: float = 0.01,
          power_w: float = 300.0, source: str = "measured", **extra) -> dict:  # fmt: skip
    """A consistent point: tok_s = batch / step_s (decode), j_per_tok = power_w / tok_s."""
    tok_s = batch / step_s if phase == "decode" else batch * (context or 512) / step_s
    return {"phase": phase, "batch": batch, "context": context, "step_s": step_s, "tok_s": tok_s,
            "power_w": power_w, "j_per_tok": power_w / tok_s, "source": source, **extra}  # fmt: skip


def doc(*points: dict, **top) -> dict:
    d = {"schema": "factory.energy-profile/1", "card": "NVIDIA H100 80GB HBM3", "driver": "580.65.06",
         "model": "llama-3.1-8b", "date": "2026-11-26", "source": "measured", "method": "kernels/probe.py",
         "points": list(points) or [point(1), point(8, step_s=0.012, power_w=400.0)]}  # fmt: skip
    d.update(top)
    return d


# -- the published profile ------------------------------------------------------------------


def test_published_profile_loads_with_the_published_figures():
    profile = load_profile(PUBLISHED)
    assert profile.source == "published" and profile.card == "NVIDIA H100 80GB HBM3" and profile.driver is None
    curve = profile.decode_curve()
    assert [p.batch for p in curve] == [8, 64, 128, 256, 512]
    assert [p.tok_s for p in curve] == [1070, 5147, 7037, 9010, 9806]
    assert [p.j_per_tok for p in curve] == [0.455, 0.119, 0.095, 0.0766, 0.0702]
    assert [p.power_w for p in curve if "power_w" not in p.extra["derived"]] == [486, 610, 691, 688]
    for p in curve:
        assert p.context is None and p.source == "published"
        assert p.power_w / p.tok_s == pytest.approx(p.j_per_tok, rel=0.005)
        assert p.step_s == pytest.approx(p.batch / p.tok_s, rel=1e-5) and "step_s" in p.extra["derived"]
    assert curve[2].extra["derived"] == ["power_w", "step_s"] and "p99_itl_s" not in curve[2].extra
    assert [p.extra.get("p99_itl_s") for p in curve] == [0.0109, 0.0257, None, 0.0597, 0.107]


def test_published_file_is_in_canonical_form():
    """The file is exactly what save() writes, so regenerating it never churns the diff."""
    assert load_profile(PUBLISHED).to_json() == PUBLISHED.read_text()


# -- every rule, with its path --------------------------------------------------------------


def broken(mutate) -> list[str]:
    d = doc()
    mutate(d)
    return validate(d)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema="factory.energy-profile/2"), "schema: must be 'factory.energy-profile/1'"),
        (lambda d: d.pop("schema"), "schema: missing"),
        (lambda d: d.update(card=""), "card: must be a non-empty string"),
        (lambda d: d.update(model=None), "model: must be a non-empty string"),
        (lambda d: d.update(method="  "), "method: must be a non-empty string"),
        (lambda d: d.update(driver=580), "driver: must be a non-empty string"),
        (lambda d: d.update(date="26/11/2026"), "date: must be an ISO date YYYY-MM-DD"),
        (lambda d: d.update(date="20261126"), "date: must be an ISO date YYYY-MM-DD"),
        (lambda d: d.update(date="2026-02-30"), "date: must be an ISO date YYYY-MM-DD"),
        (lambda d: d.update(source="guessed"), "source: must be one of measured, published, modeled"),
        (lambda d: d.update(points=[]), "points: must be a non-empty list"),
        (lambda d: d.update(points={"0": point(1)}), "points: must be a non-empty list"),
        (lambda d: d.update(point=[]), "point: unknown key"),
        (lambda d: d.update(skipped={}), "skipped: must be a list"),
        (
            lambda d: d.update(skipped=[{"phase": "decode", "batch": 0, "context": 8, "reason": "oom"}]),
            "skipped[0].batch: must be an integer >= 1",
        ),
        (lambda d: d.update(skipped=[{"phase": "decode", "batch": 1, "context": 8}]), "skipped[0].reason: missing"),
        (lambda d: d["points"].append(7), "points[2]: must be an object"),
        (lambda d: d["points"][1].pop("power_w"), "points[1].power_w: missing"),
        (lambda d: d["points"][1].update(phase="generate"), "points[1].phase: must be one of decode, prefill"),
        (lambda d: d["points"][1].update(source="guessed"), "points[1].source: must be one of"),
        (lambda d: d["points"][1].update(batch=0), "points[1].batch: must be an integer >= 1"),
        (lambda d: d["points"][1].update(batch=8.0), "points[1].batch: must be an integer >= 1"),
        (lambda d: d["points"][1].update(batch=True), "points[1].batch: must be an integer >= 1"),
        (lambda d: d["points"][1].update(context=0), "points[1].context: must be an integer >= 1"),
        (lambda d: d["points"][1].update(context="512"), "points[1].context: must be an integer >= 1"),
        (lambda d: d["points"][1].update(context=None), "points[1].context: null is allowed only for source"),
        (lambda d: d["points"][1].update(step_s=0), "points[1].step_s: must be > 0"),
        (lambda d: d["points"][1].update(tok_s=-800.0), "points[1].tok_s: must be > 0"),
        (lambda d: d["points"][1].update(power_w=math.inf), "points[1].power_w: must be > 0"),
        (lambda d: d["points"][1].update(j_per_tok=math.nan), "points[1].j_per_tok: must be > 0"),
        (lambda d: d["points"][1].update(j_per_tok="0.6"), "points[1].j_per_tok: must be > 0"),
        (lambda d: d["points"][1].update(card=""), "points[1].card: must be a non-empty string"),
        (lambda d: d["points"][1].update(date="yesterday"), "points[1].date: must be an ISO date"),
        (lambda d: d["points"][1].update(j_per_tok=0.6 * 1.06), "points[1].j_per_tok: 0.636 is not power_w / tok_s"),
        (
            lambda d: d["points"][1].update(tok_s=620.0, j_per_tok=400 / 620),
            "points[1].tok_s: 620 is not batch / step_s = 666.667",
        ),
        (lambda d: d["points"].append(point(8, step_s=0.02)), "points[2]: duplicates points[1]"),
    ],
)
def test_each_rule_names_the_path(mutate, message):
    assert doc()["points"][1]["j_per_tok"] == pytest.approx(0.6)  # the baseline the examples perturb
    assert validate(doc()) == []
    problems = broken(mutate)
    assert any(p.startswith(message) for p in problems), problems


def test_consistency_within_five_percent_passes():
    assert broken(lambda d: d["points"][1].update(j_per_tok=0.6 * 1.049)) == []
    assert broken(lambda d: d["points"][1].update(tok_s=634.0, j_per_tok=400 / 634)) == []  # 4.9 % short


def test_published_points_may_run_short_of_full_batches_and_leave_context_open():
    """A server's throughput at max_num_seqs=64 need not be 64 / step_s; a null context is its mix."""
    p = point(64, None, source="published")
    p["tok_s"] /= 2
    p["j_per_tok"] *= 2
    assert validate(doc(p, source="published")) == []
    assert validate(doc(point(64, None, source="modeled")))[0].startswith("points[0].context: null is allowed only")


def test_prefill_is_not_held_to_batch_over_step():
    assert validate(doc(point(4, 512, phase="prefill"))) == []


def test_duplicates_are_by_phase_batch_and_context():
    assert validate(doc(point(8, 512), point(8, 2048), point(8, 512, phase="prefill"))) == []
    assert validate(doc(point(8, 512), point(8, 512, step_s=0.02))) == [
        "points[1]: duplicates points[0] (phase, batch, context) = ('decode', 8, 512)"
    ]


def test_every_problem_is_reported_at_once():
    d = doc(point(1), point(8), extra_key=1)
    d.pop("card")
    d["points"][0]["batch"] = 0
    d["points"][1]["power_w"] = -1.0
    problems = validate(d)
    assert problems[:2] == ["extra_key: unknown key (allowed: schema, card, model, date, source, method, points, "
                            "driver, reference, skipped)", "card: missing"]  # fmt: skip
    assert "points[0].batch: must be an integer >= 1, got 0" in problems
    assert "points[1].power_w: must be > 0 (a finite number), got -1.0" in problems
    with pytest.raises(ProfileError) as err:
        parse_profile(d, "p.json")
    assert err.value.problems == problems and str(err.value).startswith("p.json: 4 problem(s):\n  - extra_key")


def test_not_an_object_and_not_json(tmp_path):
    assert validate([]) == ["document: must be a JSON object"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ProfileError, match="document: cannot read JSON"):
        load_profile(bad)


def test_unknown_top_level_key_is_rejected_on_load(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(doc(refrence="ML.ENERGY")))
    with pytest.raises(ProfileError, match="refrence: unknown key"):
        load_profile(path)


# -- lookups --------------------------------------------------------------------------------


def test_interpolation_is_exact_at_measured_batches():
    profile = load_profile(PUBLISHED)
    for p in profile.decode_curve():
        assert profile.j_per_tok(p.batch) == p.j_per_tok
        assert profile.power_w(p.batch) == p.power_w and profile.step_s(p.batch) == p.step_s
        assert profile.tok_s(p.batch) == p.tok_s


def test_interpolation_is_linear_in_log2_batch():
    profile = load_profile(PUBLISHED)
    # 16 is one doubling of three from 8 to 64; sqrt(8 * 64) is halfway in log2.
    assert profile.j_per_tok(16) == pytest.approx(0.455 + (0.119 - 0.455) / 3)
    assert profile.j_per_tok(math.sqrt(8 * 64)) == pytest.approx((0.455 + 0.119) / 2)
    assert profile.power_w(32) == pytest.approx(486 + (610 - 486) * 2 / 3)
    s128, s256 = (p.step_s for p in profile.decode_curve()[2:4])
    assert profile.step_s(181) == pytest.approx(s128 + (s256 - s128) * math.log2(181 / 128))


def test_interpolation_clamps_outside_the_measured_batches():
    profile = load_profile(PUBLISHED)
    assert profile.j_per_tok(1) == profile.j_per_tok(7.5) == 0.455
    assert profile.j_per_tok(4096) == 0.0702 and profile.power_w(1024) == 688
    with pytest.raises(ValueError, match="batch must be > 0"):
        profile.j_per_tok(0)


def measured_profile():
    return parse_profile(doc(
        point(1, 512, step_s=0.010), point(8, 512, step_s=0.012),
        point(1, 2048, step_s=0.011), point(8, 2048, step_s=0.016),
        point(4, 512, phase="prefill", step_s=0.05),
    ))  # fmt: skip


def test_decode_curve_picks_the_exact_or_nearest_context():
    profile = measured_profile()
    assert [(p.batch, p.context) for p in profile.decode_curve(2048)] == [(1, 2048), (8, 2048)]
    assert {p.context for p in profile.decode_curve(700)} == {512}  # nearer 512 in log2
    assert {p.context for p in profile.decode_curve(1024)} == {2048}  # equidistant in log2: the longer
    assert {p.context for p in profile.decode_curve(1500)} == {2048}
    assert {p.context for p in profile.decode_curve(100_000)} == {2048}
    assert {p.context for p in profile.decode_curve(1)} == {512}
    assert {p.context for p in profile.decode_curve()} == {512}  # no context-free curve: the shortest
    assert profile.step_s(8, context=1800) == 0.016 and profile.step_s(8, context=600) == 0.012
    assert profile.step_s(4, context=512, phase="prefill") == 0.05
    with pytest.raises(ValueError, match="context must be >= 1"):
        profile.decode_curve(0)


def test_context_free_curve_answers_any_context_and_none_prefers_it():
    published = load_profile(PUBLISHED)
    assert published.decode_curve(4096) == published.decode_curve()
    with pytest.raises(LookupError, match="no prefill points"):
        published.j_per_tok(8, phase="prefill")
    mixed = parse_profile(doc(point(8, None, source="published"), point(8, 512, step_s=0.02)))
    assert mixed.decode_curve()[0].context is None and mixed.decode_curve(300)[0].context == 512


def test_save_and_load_round_trip(tmp_path):
    original = parse_profile(doc(
        point(8, 2048), point(1, 512, repeats=3, sanity_ok=True), point(8, 512),
        skipped=[{"phase": "decode", "batch": 512, "context": 2048, "reason": "out of memory"}],
    ))  # fmt: skip
    path = tmp_path / "p.json"
    dataclasses.replace(original, points=original.points[::-1]).save(path)
    again = load_profile(path)
    assert again == original and again.skipped == original.skipped
    written = json.loads(path.read_text())["points"]
    assert [(p["batch"], p["context"]) for p in written] == [(1, 512), (8, 512), (8, 2048)]  # sorted
    assert again.points[0].extra == {"repeats": 3, "sanity_ok": True}
    text = path.read_text()
    assert text.startswith('{\n  "schema": "factory.energy-profile/1",\n  "card"') and text == again.to_json()


def test_save_validates_first_and_writes_nothing(tmp_path):
    good = parse_profile(doc())
    bad = dataclasses.replace(good, points=(*good.points, dataclasses.replace(good.points[0], batch=64, power_w=-1.0)))
    path = tmp_path / "p.json"
    with pytest.raises(ProfileError, match=r"points\[2\].power_w: must be > 0"):
        bad.save(path)
    assert not path.exists()
