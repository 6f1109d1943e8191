"""`factory tenants | keys | packages | plans | usage | ledger`: the operator's hands on the ledger.

Every command takes `--ledger` as a SQLite path or a `postgresql://` URL (default
$FACTORY_LEDGER, else $FACTORY_HOME/ledger.db). Every handler returns an exit code: 0 done,
2 the user asked for something the ledger refuses (the message says what), 1 the ledger itself
could not be used (the message names it, never with its password).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import sys
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation

from sqlalchemy.exc import SQLAlchemyError

from factory.metering import keys, store
from factory.metering.ledger import (
    PRIORITY_CLASSES,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    UsageRecord,
    default_ledger,
)


class UsageError(Exception):
    """An argument that does not parse; reported like a LedgerError."""


def _command(func):
    """Open the ledger, run `func(ledger, args)`, and turn refusals into a message and exit 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        ledger = _open(args.ledger or default_ledger())
        if ledger is None:
            return 1
        try:
            return func(ledger, args) or 0
        except (LedgerError, UsageError) as err:
            print(f"factory: {err}", file=sys.stderr)
            return 2
        except (LedgerUnavailable, SQLAlchemyError) as err:
            print(f"factory: ledger {ledger.where}: {store.first_line(err)}", file=sys.stderr)
            return 1
        finally:
            ledger.close()

    return run


def _open(target: str) -> Ledger | None:
    """The ledger at `target`, or None after saying why it cannot be opened."""
    try:
        return Ledger(target)
    except (OSError, SQLAlchemyError, LedgerError, LedgerUnavailable) as err:
        where = store.describe_text(target) if "://" in target else target
        print(f"factory: cannot open ledger {where}: {store.first_line(err)}", file=sys.stderr)
        return None


# -- tenants ------------------------------------------------------------------------------


@_command
def _tenants_create(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant = ledger.create_tenant(args.name, args.priority)
    print(f"tenant {tenant.name} (priority {tenant.priority})")


@_command
def _tenants_list(ledger: Ledger, _: argparse.Namespace) -> None:
    rows = [(t.name, t.priority, _iso(t.created_at)) for t in ledger.list_tenants()]
    _print_table(("tenant", "priority", "created_at"), rows)


# -- keys ---------------------------------------------------------------------------------


@_command
def _keys_create(ledger: Ledger, args: argparse.Namespace) -> None:
    info, token = ledger.create_key(args.tenant, admin=args.admin, label=args.label)
    print(f"admin key {info.key_id}" if info.admin else f"key {info.key_id} for tenant {info.tenant}")
    print("note: the token below is shown only this once; the ledger keeps just its hash", file=sys.stderr)
    print(token)  # alone on the last line, so `| tail -1` captures it


@_command
def _keys_revoke(ledger: Ledger, args: argparse.Namespace) -> None:
    key_id = args.key
    if key_id.startswith(keys.PREFIX):
        parsed = keys.parse_token(key_id)
        if parsed is None:
            raise UsageError("that is not a well-formed factory token (tf-<key id>-<secret>)")
        key_id = parsed[0]
    elif not keys.is_key_id(key_id):
        raise UsageError(f"{key_id!r} is not a key id (12 hex digits) or a token")
    if not ledger.revoke_key(key_id):
        raise UsageError(f"no active key {key_id} (unknown or already revoked)")
    print(f"revoked key {key_id}")


@_command
def _keys_list(ledger: Ledger, args: argparse.Namespace) -> None:
    rows = [
        (k.key_id, "(admin)" if k.admin else k.tenant, k.label, _iso(k.created_at), _iso(k.revoked_at) or "active")
        for k in ledger.list_keys(args.tenant)
    ]
    _print_table(("key_id", "tenant", "label", "created_at", "revoked_at"), rows)


# -- packages -----------------------------------------------------------------------------


@_command
def _packages_grant(ledger: Ledger, args: argparse.Namespace) -> None:
    tokens = _parse_int(args.tokens, "--tokens")
    expires_at = None if args.expires is None else _parse_time(args.expires, "--expires", end_of_day=True)
    price = None if args.price is None else _parse_money(args.price, "--price")
    p = ledger.grant_package(
        args.tenant, tokens, expires_at=expires_at, price=price, currency=args.currency, category=args.category
    )
    _say_package(p)


def _say_package(p) -> None:
    paid = "" if p.price is None else f", paid {p.price:f} {p.currency}"
    scope = "every model" if p.category is None else f"category {p.category}"
    renews = "" if p.renews_at is None else ", renews then"
    print(f"package {p.id} ({p.kind}): {p.tokens_total} factory tokens for {p.tenant}, {scope}, "
          f"expires {_iso(p.expires_at) or 'never'}{renews}{paid}")  # fmt: skip


@_command
def _packages_list(ledger: Ledger, args: argparse.Namespace) -> None:
    rows = [
        (p.id, p.kind, p.plan or "-", p.category or "*", p.tokens_total, p.tokens_used, p.tokens_reserved,
         p.tokens_available, _iso(p.expires_at) or "never", _iso(p.renews_at) or "-",
         "" if p.price is None else f"{p.price:f} {p.currency}")
        for p in ledger.list_packages(args.tenant)
    ]  # fmt: skip
    _print_table(("id", "kind", "plan", "category", "total", "used", "reserved", "available", "expires_at",
                  "renews_at", "price"), rows)  # fmt: skip


# -- plans --------------------------------------------------------------------------------


@_command
def _plans_create(ledger: Ledger, args: argparse.Namespace) -> None:
    plan = ledger.create_plan(
        args.name, args.kind, _parse_int(args.tokens, "--tokens"),
        price=None if args.price is None else _parse_money(args.price, "--price"), currency=args.currency,
        valid_days=None if args.valid_days is None else _parse_int(args.valid_days, "--valid-days"),
        category=args.category, rollover=args.rollover,
    )  # fmt: skip
    print(f"plan {plan.name}: {plan.kind}, {plan.tokens} factory tokens")


@_command
def _plans_list(ledger: Ledger, args: argparse.Namespace) -> None:
    rows = [
        (p.name, p.kind, p.tokens, "" if p.price is None else f"{p.price:f} {p.currency}",
         "" if p.valid_days is None else p.valid_days, p.category or "*", "yes" if p.rollover else "",
         _iso(p.retired_at))
        for p in ledger.list_plans(include_retired=args.all)
    ]  # fmt: skip
    _print_table(("name", "kind", "tokens", "price", "valid_days", "category", "rollover", "retired_at"), rows)


@_command
def _plans_retire(ledger: Ledger, args: argparse.Namespace) -> None:
    ledger.retire_plan(args.name)
    print(f"plan {args.name} is no longer sold; what was bought stands")


@_command
def _plans_buy(ledger: Ledger, args: argparse.Namespace) -> None:
    _say_package(ledger.buy(args.tenant, args.plan, tz=args.timezone))


@_command
def _plans_cancel(ledger: Ledger, args: argparse.Namespace) -> int:
    if not ledger.cancel_subscription(args.tenant, args.plan):
        print(f"factory: tenant {args.tenant!r} has no live subscription to {args.plan!r}", file=sys.stderr)
        return 2
    print(f"cancelled: {args.tenant}'s {args.plan} runs out with the month under way")
    return 0


@_command
def _plans_renew(ledger: Ledger, args: argparse.Namespace) -> None:
    created = ledger.renew()
    for p in created:
        _say_package(p)
    print(f"{len(created)} subscription(s) renewed")


# -- usage --------------------------------------------------------------------------------

_TABLE_FIELDS = ("finished_at", "request_id", "tenant", "model", "prompt_tokens", "completion_tokens",
                 "cached_tokens", "billed_tokens", "overage_tokens", "energy_j", "cost", "currency",
                 "status")  # fmt: skip
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))


@_command
def _usage(ledger: Ledger, args: argparse.Namespace) -> None:
    if args.statement is not None:
        return _statement(ledger, args)
    since = None if args.since is None else _parse_time(args.since, "--since")
    if args.summary:
        rows = ledger.usage_summary(args.tenant, since)
        fields = ("tenant", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "billed_tokens",
                  "energy_j", "cost", "currency")  # fmt: skip
    else:
        rows = [dataclasses.asdict(r) for r in ledger.usage(args.tenant, since)]
        fields = _TABLE_FIELDS if args.format == "table" else _RECORD_FIELDS
    if args.format == "json":
        print(json.dumps([{f: _plain(r[f]) for f in fields} for r in rows], indent=2))
    elif args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(fields)
        out.writerows([_plain(r[f]) for f in fields] for r in rows)
    else:
        _print_table(fields, [[_cell(r[f]) for f in fields] for r in rows])


def _statement(ledger: Ledger, args: argparse.Namespace) -> None:
    from factory.metering import statement

    if args.tenant is None:
        raise UsageError("--statement needs --tenant")
    doc = ledger.statement(args.tenant, args.statement, tz=args.timezone)
    if args.format == "json":
        from factory.metering.service import jsonable

        print(json.dumps(jsonable(doc), indent=2))
    elif args.format == "csv":
        sys.stdout.write(statement.to_csv(doc))
    else:
        print(f"statement of {doc['tenant']} for {doc['month']} ({doc['timezone']}: {doc['from']} to {doc['until']})")
        rows = [[_cell(r[f]) for f in ("model", "category", *statement.USAGE_KEYS, "energy_j", "cost", "currency")]
                for r in doc["usage"]]  # fmt: skip
        rows += [["total", "", *[_cell(t[f]) for f in (*statement.USAGE_KEYS, "energy_j", "cost", "currency")]]
                 for t in doc["totals"]]  # fmt: skip
        _print_table(("model", "category", *statement.USAGE_KEYS, "energy_j", "cost", "currency"), rows)
        for what in ("bought", "expired"):
            print(f"\n{what}:")
            keys_ = ("package", "kind", "plan", "category", "tokens", "at")
            keys_ += (
                ("price", "currency") if what == "bought" else ("unused_tokens", "rolled_over_tokens", "expired_tokens")
            )
            _print_table(keys_, [[_cell(r[k]) for k in keys_] for r in doc[what]])


# -- ledger -------------------------------------------------------------------------------


@_command
def _ledger_migrate(source: Ledger, args: argparse.Namespace) -> int | None:
    from factory.metering import migrate

    target = _open(args.to)
    if target is None:
        return 1
    try:
        print(f"copying {source.where} -> {target.where}", file=sys.stderr)
        done = migrate.copy(source, target)
    finally:
        target.close()
    for line in done.lines():
        print(line)
    print(f"verified: {target.where} ties out with {source.where}")
    return None


# -- parsing and printing -----------------------------------------------------------------


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} must be a whole number, got {text!r}") from None


def _parse_money(text: str, what: str) -> Decimal:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{what} must be an amount such as 99.50, got {text!r}") from None
    if not amount.is_finite():
        raise UsageError(f"{what} must be a finite amount, got {text!r}")
    return amount


def _parse_time(text: str, what: str, *, end_of_day: bool = False) -> datetime:
    """YYYY-MM-DD (midnight UTC starting that day, or ending it if `end_of_day`: an expiry date
    means the package is good through that day) or an ISO datetime (UTC unless it says)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if end_of_day else 0)
            return datetime.combine(day, time(), timezone.utc)
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)  # 3.10: no Z
    except ValueError:
        raise UsageError(f"{what} must be a date (YYYY-MM-DD) or ISO datetime, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _iso(when: datetime | None) -> str:
    return "" if when is None else when.isoformat(timespec="seconds")


def _plain(value):
    """JSON/CSV-safe: Decimal as its exact fixed-point string (never 1E-12), datetimes as ISO text."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _cell(value) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return _iso(value)
    return "" if value is None else str(value)


def _print_table(headers, rows) -> None:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# -- argparse -----------------------------------------------------------------------------


def _rates(args: argparse.Namespace) -> int:
    """Each model's rates (and how `auto` derived them) and what a pack buys on it."""
    from factory.config import ConfigError, load_config
    from factory.metering.rates import price_list
    from factory.policy.profile import ProfileError

    try:
        cfg = load_config(args.config)
        pack_price = Decimal(args.pack_price)
        rows = price_list(cfg, args.device == "cuda", args.pack_tokens, pack_price, args.prompt, args.output)
    except (ConfigError, ProfileError, ValueError, ArithmeticError, OSError) as err:
        print(f"factory: {err}", file=sys.stderr)
        return 2
    currency = cfg.cost.currency if args.currency is None else args.currency
    print(f"1 factory token = the energy of one output token of the reference model; a pack of "
          f"{args.pack_tokens:,} factory tokens for {pack_price} {currency}; requests of {args.prompt} prompt + "
          f"{args.output} output tokens, no prefix hit")  # fmt: skip
    for r in rows:
        print(f"\n{r.model}: input {r.rates.input}, cached input {r.rates.cached_input}, output {r.rates.output} "
              f"factory tokens per token")  # fmt: skip
        if r.derivation is not None:
            d = r.derivation
            prefill = (
                "none (input priced as output)" if d.prefill_j_per_tok is None else f"{d.prefill_j_per_tok:.4g} J/token"
            )
            print(f"  auto: {d.profile} at batch {d.batch}: decode {d.decode_j_per_tok:.4g} J/token, prefill "
                  f"{prefill}; reference {d.reference} at batch {d.reference_batch}: "
                  f"{d.reference_j_per_tok:.4g} J/token")  # fmt: skip
        energy = "unknown" if r.energy_j is None else f"{r.energy_j[0]:.3g} J ({r.energy_j[1]})"
        print(f"  a request: {r.per_request} factory tokens, {format(r.price_per_request, '.6f')} {currency}, "
              f"energy {energy}; the pack buys {r.requests:,} requests")  # fmt: skip
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `tenants`, `keys`, `packages`, `ledger` and `usage` on the `factory` command."""

    def leaf(group, name: str, func, about: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=about)
        p.add_argument(
            "--ledger",
            default=None,
            help="SQLite path or postgresql://user@host/db (default: $FACTORY_LEDGER, else $FACTORY_HOME/ledger.db)",
        )
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("rates", help="each model's factory-token rates, how auto derives them, what a pack buys")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="price the models as on this device")
    p.add_argument("--pack-tokens", type=int, default=400_000, help="factory tokens in a pack (default 400000)")
    p.add_argument("--pack-price", default="1", help="what a pack costs (default 1)")
    p.add_argument("--currency", default=None, help="the pack's currency (default: the config's cost.currency)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens of a request (default 512)")
    p.add_argument("--output", type=int, default=256, help="output tokens of a request (default 256)")
    p.set_defaults(func=_rates)

    tenants = sub.add_parser("tenants", help="who may use the factory").add_subparsers(
        dest="tenants_command", required=True
    )
    p = leaf(tenants, "create", _tenants_create, "add a tenant")
    p.add_argument("name", help="1-64 characters from A-Z a-z 0-9 . _ -")
    p.add_argument("--priority", default="standard", choices=PRIORITY_CLASSES, help="scheduling class")
    leaf(tenants, "list", _tenants_list, "all tenants")

    keys_ = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = leaf(keys_, "create", _keys_create, "issue a key; its token is printed once, on the last line")
    owner = p.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="the tenant the key bills to")
    owner.add_argument("--admin", action="store_true", help="an admin key (belongs to no tenant)")
    p.add_argument("--label", default="", help="a note to tell keys apart")
    p = leaf(keys_, "revoke", _keys_revoke, "revoke a key")
    p.add_argument("key", help="key id (12 hex digits) or the whole token")
    p = leaf(keys_, "list", _keys_list, "keys (never their secrets)")
    p.add_argument("--tenant", default=None, help="only this tenant's keys")

    packages = sub.add_parser("packages", help="prepaid token packages").add_subparsers(
        dest="packages_command", required=True
    )
    p = leaf(packages, "grant", _packages_grant, "give a tenant prepaid tokens")
    p.add_argument("--tenant", required=True)
    p.add_argument("--tokens", required=True, help="how many tokens")
    p.add_argument("--expires", default=None, help="YYYY-MM-DD (good through that day, UTC) or ISO datetime")
    p.add_argument("--price", default=None, help="what the tenant paid, e.g. 99.50")
    p.add_argument("--currency", default="CNY", help="ISO 4217 code (default CNY)")
    p.add_argument("--category", default=None, help="the model category it pays for (default: every model)")
    p = leaf(packages, "list", _packages_list, "a tenant's packages and what is left of them")
    p.add_argument("--tenant", required=True)

    plans = sub.add_parser("plans", help="the plan catalogue: packs, monthly subscriptions, trials").add_subparsers(
        dest="plans_command", required=True
    )
    p = leaf(plans, "create", _plans_create, "add a plan to the catalogue")
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=("pack", "monthly", "trial"))
    p.add_argument("--tokens", required=True, help="factory tokens per pack, trial or month")
    p.add_argument("--price", default=None, help="e.g. 9.9")
    p.add_argument("--currency", default="CNY", help="ISO 4217 code (default CNY)")
    p.add_argument("--valid-days", default=None, help="pack / trial: days from purchase (a trial needs it)")
    p.add_argument("--category", default=None, help="the model category it pays for (default: every model)")
    p.add_argument("--rollover", action="store_true", help="monthly: unused tokens carry into the next month")
    p = leaf(plans, "list", _plans_list, "the plans on sale")
    p.add_argument("--all", action="store_true", help="retired ones too")
    p = leaf(plans, "retire", _plans_retire, "stop selling a plan")
    p.add_argument("name")
    p = leaf(plans, "buy", _plans_buy, "a tenant buys a plan (a monthly plan: subscribes)")
    p.add_argument("--tenant", required=True)
    p.add_argument("plan")
    p.add_argument(
        "--timezone",
        default="UTC",
        help="monthly: the IANA zone its months are counted in (the config's cost.timezone)",
    )
    p = leaf(plans, "cancel", _plans_cancel, "end a subscription after the month under way")
    p.add_argument("--tenant", required=True)
    p.add_argument("plan")
    leaf(
        plans,
        "renew",
        _plans_renew,
        "give every subscription this month's package if it has none (the service does it every minute)",
    )

    ledger_ = sub.add_parser("ledger", help="the ledger's storage").add_subparsers(dest="ledger_command", required=True)
    p = leaf(ledger_, "migrate", _ledger_migrate, "copy this ledger into an empty one (e.g. SQLite -> PostgreSQL)")
    p.add_argument("--to", required=True, help="the target: postgresql://user@host:port/db (or a SQLite path)")

    p = leaf(sub, "usage", _usage, "usage records, newest first, or per-tenant totals")
    p.add_argument("--tenant", default=None, help="only this tenant")
    p.add_argument("--since", default=None, help="YYYY-MM-DD or ISO datetime (UTC unless it says)")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"))
    p.add_argument("--summary", action="store_true", help="per-tenant totals instead of records")
    p.add_argument("--statement", default=None, metavar="YYYY-MM", help="a tenant's monthly statement (needs --tenant)")
    p.add_argument(
        "--timezone", default="UTC", help="--statement: the zone its month is in (the config's cost.timezone)"
    )
