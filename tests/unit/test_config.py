"""Config validation: every bad field is reported by name with the reason, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factory.config import DEFAULT_CONFIG_PATH, ConfigError, FactoryConfig, load_config, parse_config, with_overrides

FACTORY_BIN = Path(sys.executable).with_name("factory")


def test_default_yaml_is_exactly_the_built_in_default():
    assert load_config(DEFAULT_CONFIG_PATH) == FactoryConfig()
    assert load_config(None) == FactoryConfig()


def test_embedded_default_is_loopback_smollm_on_port_8000():
    cfg = FactoryConfig()
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.server.is_loopback
    assert [m.served_name for m in cfg.models] == ["smollm2-135m"]


@pytest.mark.parametrize(
    "data, where, why",
    [
        ({"server": {"port": 70000}}, "server.port", "less than or equal to 65535"),
        ({"server": {"prot": 8000}}, "server.prot", "Extra inputs are not permitted"),
        ({"models": []}, "models", "at least 1 item"),
        ({"models": [{"replicas": 0}]}, "models.0.replicas", "greater than or equal to 1"),
        ({"models": [{"dtype": "int3"}]}, "models.0.dtype", "'bfloat16'"),
        ({"models": [{"max_model_len": "long"}]}, "models.0.max_model_len", "valid integer"),
        ({"models": [{"engine_kwargs": {"max_model_len": 9}}]}, "models.0", "engine_kwargs may not set max_model_len"),
        ({"models": [{"name": "a b"}]}, "models.0.name", "without spaces"),
        ({"log_level": "loud"}, "log_level", "'debug'"),
        ({"ledger": {"path": "/x.db", "url": "postgresql://h/db"}}, "ledger", "not both"),
        ({"ledger": {"url": "mysql://h/db"}}, "ledger", "must be postgresql://"),
        ({"ledger": {"url": "/srv/ledger.db"}}, "ledger", "a SQLite file goes in ledger.path"),
        ({"ledger": {"url": "postgresql://u:s3cret@h/db"}}, "ledger", "put it in ~/.pgpass or $PGPASSWORD"),
    ],
)
def test_bad_field_is_named_with_reason(data, where, why):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    text = str(exc.value)
    assert f"  {where}:" in text
    assert why in text
    assert "s3cret" not in text


def test_duplicate_served_names_are_rejected():
    with pytest.raises(ConfigError, match="repeated: m"):
        parse_config({"models": [{"name": "m"}, {"name": "m", "source": "org/other"}]})


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        parse_config({"server": {"port": 0, "host": 5}, "ray": {"num_cpus": 0}})
    text = str(exc.value)
    assert "server.port" in text and "server.host" in text and "ray.num_cpus" in text


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_cli_overrides_win_and_are_validated():
    cfg = with_overrides(FactoryConfig(), server={"port": 9001, "host": None}, ray={"address": "auto"})
    assert cfg.server.port == 9001 and cfg.server.host == "127.0.0.1" and cfg.ray.address == "auto"
    with pytest.raises(ConfigError, match="server.port"):
        with_overrides(FactoryConfig(), server={"port": 0})


def test_public_bind_is_not_loopback():
    assert not parse_config({"server": {"host": "0.0.0.0"}, "auth": "required"}).server.is_loopback
    assert parse_config({"server": {"host": "::1"}}).server.is_loopback


def test_no_auth_on_a_public_address_is_refused_unless_overridden():
    with pytest.raises(ConfigError, match="auth is disabled but server.host is 0.0.0.0"):
        parse_config({"server": {"host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="auth is disabled"):
        with_overrides(FactoryConfig(), server={"host": "10.0.0.5"})
    open_door = parse_config({"server": {"host": "0.0.0.0", "allow_unauthenticated": True}})
    assert open_door.auth == "disabled"
    assert with_overrides(FactoryConfig(), server={"host": "0.0.0.0"}, top={"auth": "required"}).auth == "required"


def test_cli_refuses_a_public_bind_without_auth():
    r = subprocess.run([str(FACTORY_BIN), "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "auth is disabled but server.host is 0.0.0.0" in r.stderr


def test_money_in_config_is_exact_decimal():
    cfg = parse_config({"cost": {"price_per_kwh": 0.1, "pue": 1.3, "gpu_price_per_hour": 2.35, "currency": "USD"}})
    assert str(cfg.cost.price_per_kwh) == "0.1" and str(cfg.cost.gpu_price_per_hour) == "2.35"


@pytest.mark.parametrize(
    "cost, why",
    [
        ({"currency": "yuan"}, "3-letter ISO 4217"),
        ({"pue": 0.9}, "greater than or equal to 1"),
        ({"price_per_kwh": None}, "a tariff is needed"),
        ({"price_per_kwh": 1, "tou": [{"start": "00:00", "end": "00:00", "price_per_kwh": 1}]}, "not both"),
        ({"tou": [{"start": "25:00", "end": "00:00", "price_per_kwh": 1}]}, "HH:MM"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
    ],
)
def test_bad_cost_section_is_refused(cost, why):
    with pytest.raises(ConfigError, match=why):
        parse_config({"cost": cost})


def test_reservation_ttl_defaults_beyond_the_request_timeout():
    cfg = parse_config({"server": {"request_timeout_s": 100}})
    assert cfg.reservation_ttl_s == 160
    assert parse_config({"ledger": {"reservation_ttl_s": 5}}).reservation_ttl_s == 5


def test_serve_refuses_a_bad_config_before_starting_anything(tmp_path):
    cfg = tmp_path / "factory.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"replicas": -1}]}))
    r = subprocess.run([str(FACTORY_BIN), "serve", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "models.0.replicas" in r.stderr
    assert "Ray" not in r.stderr + r.stdout  # nothing was started


# -- scheduler and power sections ---------------------------------------------------------


def test_scheduler_and_power_defaults():
    cfg = FactoryConfig()
    assert (cfg.routing.policy, cfg.routing.body_limit_kib) == ("energy", 256)
    assert (cfg.scheduler.policy, cfg.scheduler.profile) == ("energy", "auto")
    assert (cfg.scheduler.slo.ttft_ms, cfg.scheduler.slo.tpot_ms) == (2000, 250)
    budget, governor, actuators = cfg.power.budget, cfg.power.governor, cfg.power.actuators
    assert (budget.site_w, budget.node_w, budget.gpu_w) == (None, None, None)
    assert (governor.interval_ms, governor.slow_below, governor.shed_below) == (500, 0.75, 0.5)
    assert (governor.hysteresis, governor.hold_s, governor.retry_after_s) == (0.05, 5.0, 5)
    assert not actuators.nvml_power_limit and not actuators.nvml_locked_clocks


def test_power_budgets_are_read_in_any_unit_and_held_in_watts():
    cfg = parse_config({"power": {"budget": {"site_w": "1.2 MW", "node_w": "30kW", "gpu_w": 700}}})
    assert (cfg.power.budget.site_w, cfg.power.budget.node_w, cfg.power.budget.gpu_w) == (1.2e6, 30e3, 700.0)
    # CLI overrides re-validate the dumped config: the parsed watts must survive the round trip.
    again = with_overrides(cfg, server={"port": 9001})
    assert again.power == cfg.power and again.server.port == 9001


@pytest.mark.parametrize(
    "data, where, why",
    [
        ({"power": {"budget": {"site_w": "5 mW"}}}, "power.budget.site_w", "milliwatts"),
        ({"power": {"budget": {"gpu_w": "700 V"}}}, "power.budget.gpu_w", "units W, kW, MW"),
        ({"power": {"budget": {"node_w": 0}}}, "power.budget.node_w", "above 0 W"),
        ({"power": {"budget": {"site_w": True}}}, "power.budget.site_w", "a number of watts"),
        ({"power": {"budget": {"replica_w": 5}}}, "power.budget.replica_w", "Extra inputs are not permitted"),
        ({"power": {"governor": {"shed_below": 0.8}}}, "power.governor", "shed_below must be below slow_below"),
        ({"power": {"governor": {"slow_below": 1.5}}}, "power.governor.slow_below", "less than or equal to 1"),
        ({"power": {"governor": {"shed_below": 0}}}, "power.governor.shed_below", "greater than 0"),
        ({"power": {"governor": {"hysteresis": 0.6}}}, "power.governor.hysteresis", "less than or equal to 0.5"),
        ({"power": {"governor": {"interval_ms": 10}}}, "power.governor.interval_ms", "greater than or equal to 50"),
        ({"power": {"governor": {"hold_s": -1}}}, "power.governor.hold_s", "greater than or equal to 0"),
        ({"power": {"governor": {"retry_after_s": 0}}}, "power.governor.retry_after_s", "greater than or equal to 1"),
        ({"scheduler": {"policy": "fast"}}, "scheduler.policy", "'energy' or 'stock'"),
        ({"scheduler": {"profile": " "}}, "scheduler.profile", "a path, auto or null"),
        ({"scheduler": {"slo": {"tpot_ms": 0}}}, "scheduler.slo.tpot_ms", "greater than 0"),
        ({"routing": {"policy": "random"}}, "routing.policy", "'energy' or 'leastconn'"),
        ({"routing": {"body_limit_kib": 1}}, "routing.body_limit_kib", "greater than or equal to 16"),
        ({"models": [{"router": "energy"}]}, "models.0.router", "Extra inputs are not permitted"),
    ],
)
def test_bad_scheduler_or_power_field_is_named_with_reason(data, where, why):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    text = str(exc.value)
    assert f"  {where}:" in text
    assert why in text


def test_models_on_one_port_share_one_replica_shape():
    two = [{"name": "a", "source": "/m/a"}, {"name": "b", "source": "/m/b"}]
    assert [m.served_name for m in parse_config({"models": two}).models] == ["a", "b"]
    with pytest.raises(ConfigError, match="b differs from a in tensor_parallel_size, replica_num_cpus"):
        parse_config({"models": [two[0], {**two[1], "tensor_parallel_size": 2, "replica_num_cpus": 2}]})
    with pytest.raises(ConfigError, match="leastconn cannot route by model"):
        parse_config({"models": two, "routing": {"policy": "leastconn"}})
    assert parse_config({"routing": {"policy": "leastconn"}}).routing.policy == "leastconn"


def test_units_are_converted_once_in_the_config():
    cfg = parse_config({"scheduler": {"slo": {"ttft_ms": 1500, "tpot_ms": 40}}, "telemetry": {"sample_interval_ms": 50}})
    assert (cfg.scheduler.slo.ttft_s, cfg.scheduler.slo.tpot_s) == (1.5, 0.04)
    assert cfg.telemetry.sample_interval_s == 0.05
    assert cfg.power.governor.interval_s == 0.5


def test_energy_scheduler_needs_telemetry():
    with pytest.raises(ConfigError, match="scheduler.policy is energy but telemetry.enabled is false"):
        parse_config({"telemetry": {"enabled": False}})
    stock = parse_config({"telemetry": {"enabled": False}, "scheduler": {"policy": "stock"}})
    assert stock.scheduler.policy == "stock" and not stock.telemetry.enabled


def test_profile_path_resolves_auto_null_and_paths(tmp_path, monkeypatch):
    auto = FactoryConfig().scheduler
    profiles = DEFAULT_CONFIG_PATH.parent / "profiles"
    assert auto.profile_path(gpu=True) == profiles / "h100-sxm-llama-3.1-8b.published.json"
    assert auto.profile_path(gpu=True).is_file()
    assert auto.profile_path(gpu=False) == profiles / "cpu-smollm2-135m.modeled.json"
    assert parse_config({"scheduler": {"profile": None}}).scheduler.profile_path(gpu=True) is None
    monkeypatch.chdir(tmp_path)
    relative = parse_config({"scheduler": {"profile": "mine/card.json"}}).scheduler
    assert relative.profile_path(gpu=False) == tmp_path / "mine" / "card.json"
    absolute = parse_config({"scheduler": {"profile": "/opt/p.json"}}).scheduler
    assert absolute.profile_path(gpu=True) == Path("/opt/p.json")


@pytest.mark.parametrize("path", sorted(DEFAULT_CONFIG_PATH.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.models


def test_the_gpu_config_takes_the_same_data_path():
    cfg = load_config(DEFAULT_CONFIG_PATH.parent / "gpu-8b.yaml")
    assert cfg.routing.policy == "energy" and cfg.routing.body_limit_kib > 0
    assert all(m.device in ("cuda", "auto") for m in cfg.models)


def test_ledger_location_is_its_url_or_path_or_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_LEDGER", str(tmp_path / "env.db"))
    assert parse_config({}).ledger_target == str(tmp_path / "env.db")
    assert parse_config({"ledger": {"path": "/srv/l.db"}}).ledger_target == "/srv/l.db"
    url = "postgresql://billing@db.internal:5432/ledger"
    assert parse_config({"ledger": {"url": url}}).ledger_target == url
