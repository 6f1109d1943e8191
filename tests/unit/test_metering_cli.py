"""`factory tenants | keys | packages | usage | ledger` against a real ledger, a SQLite file and a
PostgreSQL database (every test runs on each): tokens are printed once on the last line, usage
exports are exact, user mistakes are a message and exit 2, and `ledger migrate` copies a SQLite
ledger into PostgreSQL with totals that tie out."""

from __future__ import annotations

import argparse
import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from factory.metering.cli import add_commands
from factory.metering.ledger import Ledger, LedgerError

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factory")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture()
def db(target) -> str:
    """The test's ledger (conftest's `target`, on each backend): a SQLite path or a PostgreSQL URL,
    as `--ledger` takes either."""
    return target


@pytest.fixture()
def cli(db, capsys):
    """cli("tenants", "list") -> (exit code, stdout, stderr), always on the test's ledger."""

    def run(*argv: str) -> tuple[int, str, str]:
        args = parser().parse_args([*argv, "--ledger", str(db)])
        code = args.func(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def seed_usage(db) -> None:
    with Ledger(db) as ledger:
        for i, (tenant, cost) in enumerate([("acme", "0.1"), ("acme", "0.2"), ("beta", "0.000000000001")]):
            ledger.settle(f"req-{i}", tenant=tenant, prompt_tokens=10 + i, completion_tokens=5, energy_j=2.5,
                          energy_source="nvml", cost=Decimal(cost), currency="CNY", model="tiny",
                          finished_at=T0 + timedelta(hours=i))  # fmt: skip


def test_tenants_create_and_list(cli):
    assert cli("tenants", "create", "acme", "--priority", "high") == (0, "tenant acme (priority high)\n", "")
    assert cli("tenants", "create", "beta")[0] == 0
    code, out, _ = cli("tenants", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["tenant", "priority", "created_at"]
    assert [line.split()[:2] for line in lines[1:]] == [["acme", "high"], ["beta", "standard"]]


def test_tenant_mistakes_are_a_message_and_exit_2(cli):
    cli("tenants", "create", "acme")
    assert cli("tenants", "create", "acme") == (2, "", "factory: tenant 'acme' already exists\n")
    code, out, err = cli("tenants", "create", "no spaces")
    assert (code, out) == (2, "") and err.startswith("factory: bad tenant name")
    with pytest.raises(SystemExit) as exc:  # argparse rejects a class it does not list
        parser().parse_args(["tenants", "create", "x", "--priority", "urgent"])
    assert exc.value.code == 2


def test_key_token_is_printed_once_on_the_last_line(cli, db):
    cli("tenants", "create", "acme")
    code, out, err = cli("keys", "create", "--tenant", "acme", "--label", "ci")
    token = out.splitlines()[-1]
    assert code == 0 and token.startswith("tf-") and out.count(token) == 1
    assert "only this once" in err and token not in err
    with Ledger(db) as ledger:
        info = ledger.verify_key(token)
    assert (info.tenant, info.label) == ("acme", "ci")

    code, out, _ = cli("keys", "list", "--tenant", "acme")
    assert code == 0 and info.key_id in out and token.split("-", 2)[2] not in out and "active" in out

    assert cli("keys", "revoke", token) == (0, f"revoked key {info.key_id}\n", "")  # a whole token works too
    with Ledger(db) as ledger:
        assert ledger.verify_key(token) is None
    code, _, err = cli("keys", "revoke", info.key_id)
    assert code == 2 and "no active key" in err


def test_admin_key_and_key_mistakes(cli):
    code, out, _ = cli("keys", "create", "--admin")
    assert code == 0 and out.splitlines()[0].startswith("admin key ")
    assert cli("keys", "create", "--tenant", "nobody") == (2, "", "factory: unknown tenant 'nobody'\n")
    assert cli("keys", "list", "--tenant", "nobody")[0] == 2
    code, _, err = cli("keys", "revoke", "not-a-key")
    assert code == 2 and "not a key id" in err
    code, _, err = cli("keys", "revoke", "tf-123-short")
    assert code == 2 and "not a well-formed" in err
    with pytest.raises(SystemExit):  # neither --tenant nor --admin
        parser().parse_args(["keys", "create"])


def test_packages_grant_and_list(cli, db):
    cli("tenants", "create", "acme")
    code, out, _ = cli("packages", "grant", "--tenant", "acme", "--tokens", "1000", "--expires", "2099-03-31",
                       "--price", "99.50")  # fmt: skip
    assert code == 0
    assert out == ("package 1 (pack): 1000 factory tokens for acme, every model, expires 2099-04-01T00:00:00+00:00,"
                   " paid 99.50 CNY\n")
    code, _, _ = cli("packages", "grant", "--tenant", "acme", "--tokens", "5", "--expires", "2099-01-01T08:00+08:00")
    assert code == 0
    with Ledger(db) as ledger:
        [dated, timed] = sorted(ledger.list_packages("acme"), key=lambda p: p.id)
        ledger.reserve("r1", "acme", 300, ttl_s=60)
    assert dated.expires_at == datetime(2099, 4, 1, tzinfo=timezone.utc)  # good through the 31st, UTC
    assert (dated.price, dated.currency) == (Decimal("99.50"), "CNY")
    assert timed.expires_at == datetime(2099, 1, 1, tzinfo=timezone.utc)
    code, out, _ = cli("packages", "list", "--tenant", "acme")
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and rows[0] == ["id", "kind", "plan", "category", "total", "used", "reserved", "available",
                                     "expires_at", "renews_at", "price"]  # fmt: skip
    # soonest expiry is spent first
    assert rows[1] == ["2", "pack", "-", "*", "5", "0", "5", "0", "2099-01-01T00:00:00+00:00", "-"]
    assert rows[2] == ["1", "pack", "-", "*", "1000", "0", "295", "705", "2099-04-01T00:00:00+00:00", "-", "99.50",
                       "CNY"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tenant", "acme", "--tokens", "lots"], "--tokens must be a whole number, got 'lots'"),
        (["--tenant", "acme", "--tokens", "0"], "tokens must be an integer >= 1"),
        (["--tenant", "acme", "--tokens", "5", "--price", "cheap"], "--price must be an amount"),
        (["--tenant", "acme", "--tokens", "5", "--price", "-1"], "price must be a finite amount >= 0"),
        (["--tenant", "acme", "--tokens", "5", "--expires", "31/03/2031"], "--expires must be a date (YYYY-MM-DD)"),
        (["--tenant", "acme", "--tokens", "5", "--expires", "2001-01-01"], "is already past"),
        (["--tenant", "acme", "--tokens", "5", "--currency", "rmb"], "currency must be a 3-letter"),
        (["--tenant", "nobody", "--tokens", "5"], "unknown tenant 'nobody'"),
    ],
)
def test_grant_mistakes_are_a_message_and_exit_2(cli, argv, message):
    cli("tenants", "create", "acme")
    code, out, err = cli("packages", "grant", *argv)
    assert (code, out) == (2, "")
    assert err.startswith("factory: ") and message in err and "Traceback" not in err


def test_usage_csv_has_every_field_exactly(cli, db):
    seed_usage(db)
    code, out, _ = cli("usage", "--format", "csv", "--tenant", "acme")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["request_id"] for r in rows] == ["req-1", "req-0"]  # newest first, acme only
    assert rows[0]["cost"] == "0.2" and rows[0]["prompt_tokens"] == "11" and rows[0]["energy_source"] == "nvml"
    assert rows[0]["finished_at"] == (T0 + timedelta(hours=1)).isoformat()


def test_usage_json_keeps_money_as_exact_strings(cli, db):
    seed_usage(db)
    code, out, _ = cli("usage", "--format", "json", "--since", "2030-01-01T02:00:00Z")
    [record] = json.loads(out)
    assert code == 0 and (record["request_id"], record["cost"], record["energy_j"]) == ("req-2", "0.000000000001", 2.5)
    code, out, _ = cli("usage", "--summary", "--format", "json")
    totals = {t["tenant"]: t for t in json.loads(out)}
    assert totals["acme"] == dict(tenant="acme", requests=2, prompt_tokens=21, completion_tokens=10, cached_tokens=0,
                                  billed_tokens=31, energy_j=5.0, cost="0.3", currency="CNY")  # fmt: skip
    assert totals["beta"]["cost"] == "0.000000000001"


def test_usage_table_and_summary_table(cli, db):
    seed_usage(db)
    code, out, _ = cli("usage")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["finished_at", "request_id", "tenant"]
    assert [line.split()[1] for line in lines[1:]] == ["req-2", "req-1", "req-0"]
    code, out, _ = cli("usage", "--summary", "--since", "2030-01-01")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[1:]] == [["acme", "2"], ["beta", "1"]]


def test_usage_mistakes_are_a_message_and_exit_2(cli):
    assert cli("usage", "--since", "yesterday") == (
        2, "", "factory: --since must be a date (YYYY-MM-DD) or ISO datetime, got 'yesterday'\n")  # fmt: skip
    assert cli("usage", "--tenant", "nobody") == (2, "", "factory: unknown tenant 'nobody'\n")


def test_default_ledger_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACTORY_LEDGER", str(tmp_path / "env" / "ledger.db"))
    args = parser().parse_args(["tenants", "create", "acme"])
    assert args.func(args) == 0
    with Ledger(tmp_path / "env" / "ledger.db") as ledger:
        assert ledger.get_tenant("acme") is not None


def test_unusable_ledger_path_is_reported_not_raised(tmp_path, capsys):
    args = parser().parse_args(["tenants", "list", "--ledger", str(tmp_path)])  # a directory, not a file
    assert args.func(args) == 1
    assert capsys.readouterr().err.startswith(f"factory: cannot open ledger {tmp_path}")


def test_migrate_copies_a_sqlite_ledger_into_postgresql_and_ties_out(tmp_path, pg_url, capsys):
    source = tmp_path / "ledger.db"
    seed_usage(source)
    with Ledger(source) as ledger:
        _, token = ledger.create_key("acme", label="kept")
        package = ledger.grant_package("acme", 1000, price=Decimal("9.90"))
        ledger.create_plan("monthly", "monthly", 500, category="coding")
        ledger.create_plan("try", "trial", 50, valid_days=7)
        month, trial = ledger.buy("acme", "monthly"), ledger.buy("acme", "try")
        ledger.reserve("in-flight", "acme", 40, ttl_s=600)  # from the trial: it is spent first
    args = parser().parse_args(["ledger", "migrate", "--ledger", str(source), "--to", pg_url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "verified:" in out and "0.300000000001 CNY" in out and "reserved" in out

    with Ledger(pg_url) as copied:
        assert copied.verify_key(token).tenant == "acme"  # keys keep working: their hashes moved
        assert copied.balance("acme") == {"total": 1550, "used": 0, "reserved": 40, "available": 1510}
        assert [(p.id, p.kind, p.tokens_reserved) for p in copied.list_packages("acme")] == [
            (trial.id, "trial", 40), (month.id, "monthly", 0), (package.id, "pack", 0)]  # fmt: skip
        assert [p.name for p in copied.list_plans()] == ["monthly", "try"]
        assert copied.renew() == []  # the subscription and its month came along
        with pytest.raises(LedgerError, match="already has its free trial"):
            copied.buy("acme", "try")
        assert copied.create_plan("pack", "pack", 10).name == "pack"  # new plan ids follow the copied ones
        assert len(copied.usage()) == 3
        copied.settle("in-flight", tenant="acme", prompt_tokens=5, completion_tokens=5, energy_j=1.0,
                      energy_source="nvml", cost=Decimal("0.01"), currency="CNY", model="tiny")  # fmt: skip
        later = copied.grant_package("beta", 10)
        assert later.id > package.id  # new ids follow the copied ones
    # A second migration into the now non-empty ledger is refused, and changes nothing.
    args = parser().parse_args(["ledger", "migrate", "--ledger", str(source), "--to", pg_url])
    assert args.func(args) == 2
    assert "already holds a ledger" in capsys.readouterr().err


def test_unreachable_postgresql_is_reported_without_its_password(capsys):
    from tests.support import free_port

    url = f"postgresql://billing:hunter2secret@127.0.0.1:{free_port()}/ledger"
    args = parser().parse_args(["tenants", "list", "--ledger", url])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("factory: cannot open ledger postgresql://billing:***@127.0.0.1:")
    assert "Connection refused" in err
    assert "hunter2secret" not in err


def test_plans_are_created_bought_listed_and_cancelled(cli):
    assert cli("tenants", "create", "acme")[0] == 0
    assert cli("plans", "create", "coder-month", "--kind", "monthly", "--tokens", "5000000", "--price", "9.9",
               "--category", "coding", "--rollover") == (
        0, "plan coder-month: monthly, 5000000 factory tokens\n", "")  # fmt: skip
    assert cli("plans", "create", "try", "--kind", "trial", "--tokens", "30000000", "--valid-days", "30")[0] == 0
    code, out, _ = cli("plans", "list")
    assert code == 0 and out.splitlines()[0].split() == ["name", "kind", "tokens", "price", "valid_days", "category",
                                                          "rollover", "retired_at"]  # fmt: skip
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [["coder-month", "monthly", "5000000"],
                                                                   ["try", "trial", "30000000"]]  # fmt: skip
    code, out, _ = cli("plans", "buy", "--tenant", "acme", "coder-month", "--timezone", "Asia/Shanghai")
    assert code == 0 and "(monthly): 5000000 factory tokens for acme, category coding" in out and "renews then" in out
    code, out, _ = cli("plans", "buy", "--tenant", "acme", "try")
    assert code == 0 and "(trial): 30000000 factory tokens for acme, every model" in out
    code, out, _ = cli("packages", "list", "--tenant", "acme")
    rows = [line.split()[:4] for line in out.splitlines()[1:]]
    assert [r[1:] for r in rows] == [["trial", "try", "*"], ["monthly", "coder-month", "coding"]]  # trial spent first
    # Mistakes are a message and exit 2.
    assert cli("plans", "buy", "--tenant", "acme", "try") == (
        2, "", "factory: tenant 'acme' already has its free trial\n")  # fmt: skip
    assert cli("plans", "create", "bad", "--kind", "trial", "--tokens", "5")[0] == 2
    assert cli("plans", "buy", "--tenant", "acme", "coder-month")[2] == (
        "factory: tenant 'acme' already has a live subscription to 'coder-month'\n")  # fmt: skip
    assert cli("plans", "renew") == (0, "0 subscription(s) renewed\n", "")  # this month's is there
    assert cli("plans", "cancel", "--tenant", "acme", "coder-month")[0] == 0
    assert cli("plans", "cancel", "--tenant", "acme", "coder-month")[0] == 2
    assert cli("plans", "retire", "try")[0] == 0
    assert "try" not in cli("plans", "list")[1] and "try" in cli("plans", "list", "--all")[1]


def test_usage_statement_prints_a_month_as_table_json_and_csv(cli, db):
    seed_usage(db)  # acme: 0.1 + 0.2 CNY on 2030-01-01, UTC
    code, out, _ = cli("usage", "--statement", "2030-01", "--tenant", "acme", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["month"] == "2030-01" and doc["timezone"] == "UTC"
    assert [(t["requests"], t["cost"], t["billed_tokens"]) for t in doc["totals"]] == [(2, "0.3", 10 + 11 + 5 + 5)]
    code, out, _ = cli("usage", "--statement", "2030-01", "--tenant", "acme", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["section"], r["model"], r["requests"], r["cost"]) for r in table] == [
        ("usage", "tiny", "2", "0.3"), ("total", "", "2", "0.3")]  # fmt: skip
    code, out, _ = cli("usage", "--statement", "2030-01", "--tenant", "acme")
    assert code == 0 and out.startswith("statement of acme for 2030-01 (UTC:") and "bought:" in out
    # In Shanghai, 2030-01-01 00:00-02:00 UTC is still January: the same rows.
    code, out, _ = cli("usage", "--statement", "2030-01", "--tenant", "acme", "--format", "json",
                       "--timezone", "Asia/Shanghai")  # fmt: skip
    assert json.loads(out)["totals"][0]["requests"] == 2
    assert cli("usage", "--statement", "2030-01")[0:2] == (2, "")
    assert cli("usage", "--statement", "January", "--tenant", "acme")[2] == (
        "factory: a statement's month is YYYY-MM, got 'January'\n")  # fmt: skip
