"""Watts as people write them, and `factory power budget | status` against a real HTTP server:
changes are read-modify-write, `none` and --clear remove budgets, the factory's own error words
reach the operator, and the admin key never appears in anything printed."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from factory.cli import main
from factory.power.units import format_watts, parse_watts

KEY = "tf-0123456789ab-s3cret-admin-token"
LEVELS = ("site_w", "node_w", "gpu_w")

# -- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, watts",
    [
        ("30kW", 30e3),
        ("30 kW", 30e3),
        ("30 KW", 30e3),
        ("800W", 800.0),
        ("800 w", 800.0),
        ("1.2MW", 1.2e6),
        ("500", 500.0),
        (" 1e3 W ", 1e3),
        (".5 kW", 500.0),
        (500, 500.0),
        (2.5, 2.5),
    ],
)
def test_parse_watts_reads_w_kw_and_mw(value, watts):
    assert parse_watts(value) == pytest.approx(watts, rel=1e-12)


@pytest.mark.parametrize(
    "value, why",
    [
        ("5 mW", "milliwatts; megawatts are 'MW'"),
        ("5mw", "milliwatts"),
        ("1 GW", "units W, kW, MW"),
        ("30 kV", "units W, kW, MW"),
        ("", "units W, kW, MW"),
        ("kW", "units W, kW, MW"),
        ("nan", "units W, kW, MW"),
        ("30 kW 2", "units W, kW, MW"),
        (True, "a number of watts"),
        (None, "a number of watts"),
        ("-5 kW", "above 0 W"),
        ("0", "above 0 W"),
        (0, "above 0 W"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        ("1e999", "finite"),
    ],
)
def test_parse_watts_refuses_anything_else_naming_the_accepted_forms(value, why):
    with pytest.raises(ValueError, match="must be") as exc:
        parse_watts(value)
    assert why in str(exc.value)


@pytest.mark.parametrize(
    "watts, text",
    [(30e3, "30 kW"), (850, "850 W"), (850.25, "850.25 W"), (1.2e6, "1.2 MW"), (0.5, "0.5 W"), (1234.5678, "1.235 kW")],
)
def test_format_watts_picks_the_unit_and_reads_back(watts, text):
    assert format_watts(watts) == text
    assert math.isclose(parse_watts(text), watts, rel_tol=1e-3)


# -- a factory stand-in: the budget and governor routes over real HTTP ----------------------


class FakeFactory(ThreadingHTTPServer):
    """Serves GET/PUT /admin/power/budget and GET /admin/power with the admin key, as the ingress
    does (OpenAI-shaped errors). PUT bodies are checked against the budget API's shape."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.budgets = {"site_w": None, "node_w": None, "gpu_w": None, "nodes": {}, "replicas": {}}
        self.governor: dict | None = None  # None: this factory has no /admin/power
        self.fail: tuple[int, str] | None = None  # answer every request with this error
        self.calls: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def _bad_budget(doc) -> str | None:
    if not isinstance(doc, dict) or set(doc) != {*LEVELS, "nodes", "replicas"}:
        return f"the budget needs exactly site_w, node_w, gpu_w, nodes, replicas; got {sorted(doc)}"
    values = [doc[k] for k in LEVELS if doc[k] is not None] + [*doc["nodes"].values(), *doc["replicas"].values()]
    if any(not isinstance(w, int | float) or w <= 0 for w in values):
        return "every budget must be a number of watts above 0"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: FakeFactory

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        auth = self.headers.get("Authorization")
        self.server.calls.append((self.command, self.path, auth))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        if self.server.fail:
            return self._send(self.server.fail[0], _error(self.server.fail[1]))
        if auth is None:
            return self._send(401, _error("You didn't provide an API key."))
        if auth != f"Bearer {KEY}":
            return self._send(401, _error("Incorrect API key provided."))
        if self.path == "/admin/power" and self.command == "GET" and self.server.governor is not None:
            return self._send(200, self.server.governor)
        if self.path != "/admin/power/budget":
            return self._send(404, _error("Not Found"))
        if self.command == "PUT":
            if why := _bad_budget(body):
                return self._send(400, _error(why))
            self.server.budgets = body
        self._send(200, self.server.budgets)

    do_GET = do_PUT = _answer


@pytest.fixture()
def factory():
    server = FakeFactory()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def power(factory, capsys):
    """power("budget", "--site", "30kW") -> (exit code, stdout, stderr) against the fake factory,
    with the admin key; every run checks that the key was printed nowhere."""

    def run(*argv: str, key: str | None = KEY, url: str | None = None) -> tuple[int, str, str]:
        extra = ["--url", url or factory.url] + (["--admin-key", key] if key else [])
        code = main(["power", *argv, *extra])
        out, err = capsys.readouterr()
        assert KEY not in out + err and "s3cret" not in out + err
        return code, out, err

    return run


def rows(out: str) -> list[list[str]]:
    """A printed table's cells (columns are two or more spaces apart), header included."""
    return [re.split(r"\s{2,}", line) for line in out.splitlines()]


SEEDED = {"site_w": 30e3, "node_w": None, "gpu_w": 700.0, "nodes": {"node-a": 5e3}, "replicas": {"llm:0": 800.0}}


# -- factory power budget ------------------------------------------------------------------


def test_budget_without_flags_shows_the_budgets_and_changes_nothing(factory, power):
    factory.budgets = json.loads(json.dumps(SEEDED))
    code, out, err = power("budget")
    assert (code, err) == (0, "")
    assert rows(out) == [
        ["budget", "applies to", "power"],
        ["site", "the whole site", "30 kW"],
        ["node", "each Ray node", "none"],
        ["gpu", "each GPU", "700 W"],
        ["node", "node-a", "5 kW"],
        ["replica", "llm:0", "800 W"],
    ]
    assert factory.calls == [("GET", "/admin/power/budget", f"Bearer {KEY}")]
    assert factory.budgets == SEEDED


def test_partial_update_keeps_every_budget_not_named(factory, power):
    factory.budgets = json.loads(json.dumps(SEEDED))
    code, out, _ = power("budget", "--gpu", "650W", "--replica", "llm:1=1.5kW", "--node-w", "12 kW")
    assert code == 0
    assert [c[0] for c in factory.calls] == ["GET", "PUT"]
    assert factory.budgets == {"site_w": 30e3, "node_w": 12e3, "gpu_w": 650.0, "nodes": {"node-a": 5e3},
                               "replicas": {"llm:0": 800.0, "llm:1": 1500.0}}  # fmt: skip
    assert ["gpu", "each GPU", "650 W"] in rows(out) and ["replica", "llm:1", "1.5 kW"] in rows(out)


def test_none_removes_a_budget(factory, power):
    factory.budgets = json.loads(json.dumps(SEEDED))
    code, out, _ = power("budget", "--site", "none", "--node", "node-a=none", "--replica", "llm:0=NONE")
    assert code == 0
    assert factory.budgets == {"site_w": None, "node_w": None, "gpu_w": 700.0, "nodes": {}, "replicas": {}}
    assert rows(out)[1] == ["site", "the whole site", "none"]


def test_clear_removes_everything_then_applies_the_rest(factory, power):
    factory.budgets = json.loads(json.dumps(SEEDED))
    assert power("budget", "--clear")[0] == 0
    assert factory.budgets == {"site_w": None, "node_w": None, "gpu_w": None, "nodes": {}, "replicas": {}}
    factory.budgets = json.loads(json.dumps(SEEDED))
    assert power("budget", "--clear", "--site", "1.2MW")[0] == 0
    assert factory.budgets == {"site_w": 1.2e6, "node_w": None, "gpu_w": None, "nodes": {}, "replicas": {}}


def test_a_wrong_or_missing_key_is_the_factorys_message_and_exit_1(factory, power):
    code, out, err = power("budget", "--site", "30kW", key="tf-ffffffffffff-wrong")
    assert (code, out) == (1, "")
    assert err.startswith("factory: GET /admin/power/budget failed with HTTP 401: Incorrect API key provided.")
    assert "--admin-key or $FACTORY_ADMIN_KEY" in err and "wrong" not in err
    assert [c[0] for c in factory.calls] == ["GET"]  # nothing was changed
    code, _, err = power("budget", key=None)
    assert code == 1 and "You didn't provide an API key." in err


def test_the_key_comes_from_the_environment(factory, power, monkeypatch):
    monkeypatch.setenv("FACTORY_ADMIN_KEY", KEY)
    assert power("budget", "--gpu", "700", key=None)[0] == 0
    assert factory.calls[-1] == ("PUT", "/admin/power/budget", f"Bearer {KEY}")
    assert factory.budgets["gpu_w"] == 700.0


def test_other_http_errors_show_the_factorys_own_words(factory, power):
    factory.fail = (503, "The factory is not ready: draining. Retry shortly.")
    code, out, err = power("budget")
    assert (code, out) == (1, "")
    assert err == f"factory: GET /admin/power/budget failed with HTTP 503: {factory.fail[1]}\n"


def test_an_unreachable_factory_is_a_message_and_exit_1(power):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, out, err = power("budget", "--site", "30kW", url=url)
    assert (code, out) == (1, "")
    assert err.startswith(f"factory: cannot reach the factory at {url} (ConnectError")


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--site", "30kV"], "argument --site: must be a number of watts"),
        (["--gpu", "700 mW"], "milliwatts"),
        (["--node-w", "-1"], "above 0 W"),
        (["--replica", "llm:0"], "must be ID=W"),
        (["--node", "=5kW"], "must be ID=W"),
    ],
)
def test_bad_arguments_are_argparse_errors_exit_2(factory, capsys, argv, why):
    with pytest.raises(SystemExit) as exc:
        main(["power", "budget", *argv, "--url", factory.url, "--admin-key", KEY])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and why in err and KEY not in err
    assert factory.calls == []


# -- factory power status ------------------------------------------------------------------


def test_status_shows_each_replica_and_the_site_totals(factory, power):
    factory.governor = {
        "budgets": {"site_w": 1500.0, "node_w": None, "gpu_w": 800.0, "nodes": {}, "replicas": {}},
        "replicas": [
            {"replica": "llm:0", "power_w": 700.0, "cap_w": 800.0, "level": "normal", "reason": "within budget"},
            {"replica": "llm:1", "power_w": 550.0, "cap_w": 700.0, "level": "slow", "reason": "site budget"},
        ],
        "admission": {"low": "slow", "standard": "open"},
    }
    code, out, err = power("status")
    assert (code, err) == (0, "")
    assert rows(out)[:3] == [
        ["replica", "power", "cap", "level", "reason"],
        ["llm:0", "700 W", "800 W", "normal", "within budget"],
        ["llm:1", "550 W", "700 W", "slow", "site budget"],
    ]
    lines = out.splitlines()
    assert "site: 1.25 kW drawn by 2 replica(s), capped at 1.5 kW; site budget 1.5 kW" in lines
    assert "admission low: slow" in lines and "admission standard: open" in lines


def test_status_of_a_factory_without_a_governor_says_so(factory, power):
    code, out, err = power("status")
    assert (code, out) == (1, "")
    assert err == f"factory: the factory at {factory.url} runs no power governor (GET /admin/power: 404)\n"
