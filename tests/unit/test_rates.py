"""One token unit (factory/metering/rates.py): rates in factory tokens per raw token, the worst
case a request reserves, what it is billed, `rates: auto` from energy profiles, `factory rates`."""

from __future__ import annotations

from decimal import Decimal

import pytest

from factory.cli import main
from factory.config import AUTO_PROFILE_CPU, AUTO_PROFILE_GPU, ConfigError, parse_config
from factory.metering.rates import CACHED_SHARE, RAW, Rates, derive, for_model, operating_batch, rounded
from factory.policy.profile import load_profile

D = Decimal


def test_raw_rates_bill_the_raw_count():
    assert RAW.raw and RAW.worst(100, 50) == 150 and RAW.billed(100, 40, 50) == 150


def test_a_request_is_rounded_up_once_in_exact_decimals():
    r = Rates(input=D("0.5"), cached_input=D("0.05"), output=D("2.5"))
    assert r.worst(3, 1) == 4  # 1.5 + 2.5, no prefix hit assumed
    assert r.billed(3, 2, 1) == 4  # 0.5 + 0.1 + 2.5 = 3.1 -> 4
    assert r.billed(4, 4, 0) == 1  # 0.2 -> 1: a request is never free at a non-zero rate
    assert r.billed(10, 0, 0) == 5
    tenth = Rates(input=D("0.1"), cached_input=D("0.1"), output=D("0.1"))
    assert tenth.billed(3, 0, 0) == 1 and tenth.billed(10, 0, 0) == 1  # exact: 10 x 0.1 is 1, not 1.0000001
    assert r.billed(3, 9, 1) == r.billed(3, 3, 1)  # a cached count above the prompt is the prompt


def test_rates_refuse_negative_or_a_cached_token_dearer_than_a_fresh_one():
    with pytest.raises(ValueError, match="cached_input"):
        Rates(input=D(1), cached_input=D(2), output=D(1))
    with pytest.raises(ValueError, match=">= 0"):
        Rates(input=D(-1), cached_input=D(-1), output=D(1))


def test_config_rates_explicit_default_and_refused():
    cfg = parse_config({"models": [{"source": "smollm2-135m", "rates": {"input": 0.25, "output": "1.5"}}]})
    rates, found = for_model(cfg.models[0], cfg.scheduler, gpu=False)
    assert (rates, found) == (Rates(input=D("0.25"), cached_input=D("0.25"), output=D("1.5")), None)
    assert for_model(parse_config({}).models[0], cfg.scheduler, gpu=False)[0] == RAW
    with pytest.raises(ConfigError, match="must not exceed"):
        parse_config({"models": [{"rates": {"input": 0.5, "cached_input": 1}}]})
    with pytest.raises(ConfigError, match="rates: auto prices by an energy profile"):
        parse_config({"models": [{"rates": "auto"}], "scheduler": {"profile": None}})


def test_auto_rates_buy_the_reference_models_output_token_energy_on_every_model():
    """Output rate = the model's decode J/token over the reference's (both at their busy batch);
    input = its prefill J/token over the same; cached = a tenth of input; three digits kept."""
    cpu, ref = load_profile(AUTO_PROFILE_CPU), load_profile(AUTO_PROFILE_GPU)
    found = derive("m", AUTO_PROFILE_CPU, AUTO_PROFILE_GPU)
    ref_j = ref.j_per_tok(operating_batch(ref, "decode"), phase="decode")
    decode_j = cpu.j_per_tok(operating_batch(cpu, "decode"), phase="decode")
    prefill_j = cpu.j_per_tok(operating_batch(cpu, "prefill"), phase="prefill")
    assert found.rates.output == rounded(decode_j / ref_j)
    assert found.rates.input == rounded(prefill_j / ref_j)
    assert found.rates.cached_input == rounded(float(found.rates.input * CACHED_SHARE))
    # A factory token buys the same joules on both: the reference's output token and this model's.
    assert float(found.rates.output) * ref_j == pytest.approx(decode_j, rel=0.01)
    assert derive("ref", AUTO_PROFILE_GPU, AUTO_PROFILE_GPU).rates.output == 1
    # The reference profile has no prefill points: its input is priced as its output, and said so.
    assert derive("ref", AUTO_PROFILE_GPU, AUTO_PROFILE_GPU).prefill_j_per_tok is None
    cfg = parse_config({"models": [{"rates": "auto"}], "scheduler": {"profile": "auto"}})
    assert for_model(cfg.models[0], cfg.scheduler, gpu=False)[0] == found.rates


def test_rounded_keeps_three_significant_digits():
    assert [rounded(x) for x in (2.14749, 0.071744, 1.0, 123.456, 0.0)] == [
        D("2.15"), D("0.0717"), D("1"), D("123"), D("0")]  # fmt: skip


def test_factory_rates_prints_the_derivation_and_what_a_pack_buys(tmp_path, capsys):
    config = tmp_path / "f.yaml"
    config.write_text("models:\n  - source: smollm2-135m\n    rates: auto\n  - source: smollm2-135m\n    name: flat\n")
    assert main(["rates", str(config), "--pack-tokens", "400000", "--pack-price", "1", "--currency", "CNY"]) == 0
    out = capsys.readouterr().out
    found = derive("m", AUTO_PROFILE_CPU, AUTO_PROFILE_GPU)
    per_request = found.rates.billed(512, 0, 256)
    assert f"smollm2-135m: input {found.rates.input}, cached input {found.rates.cached_input}" in out
    assert f"a request: {per_request} factory tokens" in out and f"buys {400_000 // per_request:,} requests" in out
    assert "flat: input 1, cached input 1, output 1" in out and "a request: 768 factory tokens" in out
    assert "(modeled)" in out  # the CPU profile's energy is modeled, and says so
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - rates: {input: -1}\n")
    assert main(["rates", str(bad)]) == 2
