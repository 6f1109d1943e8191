"""result.json: a new result carries the schema and definitions, save/load round-trips, and a bad
file is refused with a message naming it; environment() describes the machine even without NVML."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from factory.bench import metrics, schema
from factory.bench.schema import SCHEMA, ResultError
from tests.unit.fake_pynvml import FakeGpu, FakePynvml, NVMLError_DriverNotLoaded, NVMLError_GpuIsLost


def a_result():
    r = schema.new_result("run", "factory", {"model": "m"}, {"host": "h"})
    r["levels"].append({"load": {"mode": "concurrency", "value": 8}, "requests": [], "failures": []})
    return r


def test_new_result_is_stamped_with_schema_kind_and_definitions():
    r = schema.new_result("sim", "sim factory", {"model": "m"}, {"host": "h"}, simulated=True)
    assert r["schema"] == SCHEMA == "factory.bench-result/1"
    assert (r["kind"], r["label"], r["simulated"]) == ("sim", "sim factory", True)
    assert r["definitions"] == metrics.DEFINITIONS and r["levels"] == []
    assert r["created_unix"] > 1.6e9
    with pytest.raises(ValueError, match="kind 'bench'"):
        schema.new_result("bench", "x", {}, {})


def test_save_then_load_round_trips_through_a_dir_or_the_file(tmp_path):
    r = a_result()
    path = schema.save(r, tmp_path / "out")
    assert path == tmp_path / "out" / "result.json"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left
    assert schema.load(tmp_path / "out") == r
    assert schema.load(path) == r


def test_load_refuses_a_dir_without_result_json(tmp_path):
    with pytest.raises(ResultError, match=f"result.json not found in {tmp_path}"):
        schema.load(tmp_path)
    with pytest.raises(ResultError, match="nope.json: not found"):
        schema.load(tmp_path / "nope.json")


def test_load_refuses_a_file_that_is_not_json(tmp_path):
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ResultError, match=r"result.json: not JSON \(.* line 1 column 2\)"):
        schema.load(tmp_path)


def test_load_refuses_another_schema(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"schema": "x", "levels": []}))
    with pytest.raises(ResultError) as exc:
        schema.load(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'result.json'}: schema is 'x', expected 'factory.bench-result/1'"
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda r: r.update(levels={}), "levels: expected a list"),
        (lambda r: r.update(kind="bench"), "kind 'bench' is not one of run, sim"),
        (lambda r: r["levels"][0].update(load={"mode": "burst"}), "levels[0].load: expected"),
        (lambda r: r["levels"][0].update(requests=None), "levels[0].requests: expected a list"),
    ],
)
def test_load_refuses_a_result_of_the_wrong_shape(tmp_path, change, problem):
    r = a_result()
    change(r)
    schema.save(r, tmp_path)
    with pytest.raises(ResultError) as exc:
        schema.load(tmp_path)
    assert problem in str(exc.value)


def test_load_refuses_json_that_is_not_an_object(tmp_path):
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ResultError, match="expected a JSON object, got list"):
        schema.load(tmp_path)


def test_environment_describes_the_machine_and_names_the_gpus(monkeypatch):
    fake = FakePynvml([FakeGpu(0), FakeGpu(1, name="NVIDIA H200")])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    env = schema.environment()
    assert env["host"] == socket.gethostname()
    assert env["cpus"] == os.cpu_count()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    assert f"Model name: {env['cpu_model']}" in " ".join(lscpu.split())  # as lscpu names it
    assert env["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert env["factory_version"] == "0.1.0"
    assert env["gpus"] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert fake.init_count == 0  # NVML shut down again


@pytest.mark.parametrize("broken", ["missing", "no driver", "lost gpu"])
def test_environment_without_a_working_nvml_lists_no_gpus(monkeypatch, broken):
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    elif broken == "no driver":
        monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(1, init_error=NVMLError_DriverNotLoaded))
    else:
        fake = FakePynvml(2)

        def lost(handle):
            raise NVMLError_GpuIsLost()

        fake.nvmlDeviceGetName = lost
        monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert schema.environment()["gpus"] == []


def test_factory_version_is_unknown_when_not_installed(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert schema.environment()["factory_version"] == "unknown"


@pytest.mark.parametrize(
    "load, label",
    [
        ({"mode": "concurrency", "value": 8}, "c=8"),
        ({"mode": "concurrency", "value": 8.0}, "c=8"),
        ({"mode": "rate", "value": 2.0, "burstiness": 1.0}, "rate=2/s"),
        ({"mode": "rate", "value": 0.5}, "rate=0.5/s"),
        ({"mode": "rate", "value": "inf"}, "rate=inf"),
        ({"mode": "rate", "value": float("inf")}, "rate=inf"),
        ({"mode": "trace", "value": None}, "trace"),
    ],
)
def test_level_labels(load, label):
    assert schema.level_label(load) == label
