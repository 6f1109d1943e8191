"""`factory power budget | status`: the operator's hands on a running factory's power budgets.

Both talk to the factory over HTTP (`/admin/power/budget`, `/admin/power`) with the admin key
from --admin-key or $FACTORY_ADMIN_KEY; the key goes only into the Authorization header, never
into output or an error message. A change is read-modify-write: the budgets not named on the
command line keep the values the factory holds now. Exit codes: 0 done, 1 the factory could not
be reached or refused, 2 a bad argument (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

from factory.power.units import format_watts, parse_watts

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 10.0
_LEVELS = ("site_w", "node_w", "gpu_w")
_MAPS = ("nodes", "replicas")
_UNSET = object()  # a level flag not given keeps the factory's value (None would mean "remove")


class FactoryUnreachable(Exception):
    """The factory did not answer, or answered with an error; the message is for the operator."""


# -- arguments ----------------------------------------------------------------------------


def _watts_or_none(text: str) -> float | None:
    """A budget on the command line: watts in any form parse_watts reads, or `none` to remove it."""
    if text.strip().lower() == "none":
        return None
    try:
        return parse_watts(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}; or none to remove the budget") from None


def _id_watts(text: str) -> tuple[str, float | None]:
    """`ID=W` (or `ID=none`) for one node's or replica's budget."""
    key, sep, watts = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must be ID=W (e.g. node-1=800W) or ID=none, got {text!r}")
    return key.strip(), _watts_or_none(watts)


def apply_changes(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The whole budget document to PUT: `current` with the flags applied (--clear first, then the
    rest on top, so `--clear --site 30kW` leaves only a site budget)."""
    doc: dict[str, Any] = {level: None if args.clear else current.get(level) for level in _LEVELS}
    for name in _MAPS:
        doc[name] = {} if args.clear else dict(current.get(name) or {})
    for level, value in (("site_w", args.site), ("node_w", args.node_w), ("gpu_w", args.gpu)):
        if value is not _UNSET:
            doc[level] = value
    for name, pairs in (("nodes", args.node), ("replicas", args.replica)):
        for key, watts in pairs:
            if watts is None:
                doc[name].pop(key, None)
            else:
                doc[name][key] = watts
    return doc


def _changes_asked(args: argparse.Namespace) -> bool:
    levels = (args.site, args.node_w, args.gpu)
    return bool(args.clear or args.node or args.replica or any(v is not _UNSET for v in levels))


# -- HTTP ---------------------------------------------------------------------------------


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict[str, Any] | None:
    """One call to the factory: its JSON object, or None for a 404 (a route this factory lacks).
    Transport failures, other error statuses and non-object answers raise FactoryUnreachable."""
    key = args.admin_key or os.environ.get("FACTORY_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as err:
        raise FactoryUnreachable(f"cannot reach the factory at {args.url} ({type(err).__name__}: {err})") from None
    if response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise FactoryUnreachable(_error_message(response, method, path))
    try:
        doc = response.json()
    except ValueError:
        raise FactoryUnreachable(f"{method} {path} did not answer with JSON: {response.text[:200]!r}") from None
    if not isinstance(doc, dict):
        raise FactoryUnreachable(f"{method} {path} answered a JSON {type(doc).__name__}, not an object")
    return doc


def _error_message(response: httpx.Response, method: str, path: str) -> str:
    """The factory's own words from its OpenAI-shaped error body, with the status and a hint on auth."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    text = f"{method} {path} failed with HTTP {response.status_code}: {message}"
    if response.status_code in (401, 403):
        text += " (give the admin key with --admin-key or $FACTORY_ADMIN_KEY)"
    return text


# -- commands -----------------------------------------------------------------------------


def _budget(args: argparse.Namespace) -> int:
    path = "/admin/power/budget"
    try:
        doc = call(args, "GET", path)
        if doc is not None and _changes_asked(args):
            doc = call(args, "PUT", path, apply_changes(doc, args))
    except FactoryUnreachable as err:
        print(f"factory: {err}", file=sys.stderr)
        return 1
    if doc is None:
        print(f"factory: the factory at {args.url} has no {path} (404)", file=sys.stderr)
        return 1
    _print_table(("budget", "applies to", "power"), budget_rows(doc))
    return 0


def _status(args: argparse.Namespace) -> int:
    path = "/admin/power"
    try:
        state = call(args, "GET", path)
    except FactoryUnreachable as err:
        print(f"factory: {err}", file=sys.stderr)
        return 1
    if state is None:
        print(f"factory: the factory at {args.url} runs no power governor (GET {path}: 404)", file=sys.stderr)
        return 1
    replicas = state.get("replicas") or []
    rows = [(r.get("replica", "?"), _w(r.get("power_w")), _w(r.get("cap_w")), r.get("level", ""), r.get("reason", ""))
            for r in replicas]  # fmt: skip
    _print_table(("replica", "power", "cap", "level", "reason"), rows)
    for line in site_lines(replicas, state.get("budgets") or {}, state.get("admission") or {}):
        print(line)
    return 0


# -- printing -----------------------------------------------------------------------------


def budget_rows(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """One row per budget: the three levels always (`none` when unset), then each node and replica."""
    rows = [
        ("site", "the whole site", _w(doc.get("site_w"), unset="none")),
        ("node", "each Ray node", _w(doc.get("node_w"), unset="none")),
        ("gpu", "each GPU", _w(doc.get("gpu_w"), unset="none")),
    ]
    rows += [("node", key, _w(w)) for key, w in sorted((doc.get("nodes") or {}).items())]
    rows += [("replica", key, _w(w)) for key, w in sorted((doc.get("replicas") or {}).items())]
    return rows


def site_lines(replicas: list[dict[str, Any]], budgets: dict[str, Any], admission: dict[str, Any]) -> list[str]:
    """Totals under the table: what the site draws against its budget, and who is admitted."""
    power_w = sum(r.get("power_w") or 0.0 for r in replicas)
    caps = [r.get("cap_w") for r in replicas]
    capped = f", capped at {_w(sum(caps))}" if caps and None not in caps else ""
    budget = _w(budgets.get("site_w"), unset="none")
    lines = [f"site: {_w(power_w)} drawn by {len(replicas)} replica(s){capped}; site budget {budget}"]
    for name, value in admission.items():
        shown = " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"admission {name}: {shown}")
    return lines


def _w(watts: float | None, unset: str = "-") -> str:
    return unset if watts is None else format_watts(watts)


def _print_table(headers, rows) -> None:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# -- argparse -----------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `power budget` and `power status` on the `factory` command."""
    power = sub.add_parser("power", help="power budgets and the governor of a running factory")
    group = power.add_subparsers(dest="power_command", required=True)

    def leaf(name: str, func, about: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=about, description=about)
        p.add_argument("--url", default=DEFAULT_URL, help=f"the factory's address (default {DEFAULT_URL})")
        p.add_argument(
            "--admin-key",
            default=None,
            metavar="KEY",
            help="the admin key (default: $FACTORY_ADMIN_KEY); needed with auth: required",
        )
        p.set_defaults(func=func)
        return p

    p = leaf("budget", _budget, "show the power budgets, or change them (flags not given keep their value)")
    watts = "W, e.g. 800W, 30kW, 1.2MW; none removes it"
    p.add_argument("--site", type=_watts_or_none, default=_UNSET, metavar="W", help=f"site budget, {watts}")
    p.add_argument("--node-w", type=_watts_or_none, default=_UNSET, metavar="W", help=f"each Ray node, {watts}")
    p.add_argument("--gpu", type=_watts_or_none, default=_UNSET, metavar="W", help=f"each GPU, {watts}")
    p.add_argument("--node", type=_id_watts, action="append", default=[], metavar="NODE_ID=W",
                   help="one node's budget (repeatable); NODE_ID=none removes it")  # fmt: skip
    p.add_argument("--replica", type=_id_watts, action="append", default=[], metavar="REPLICA_ID=W",
                   help="one replica's budget (repeatable); REPLICA_ID=none removes it")  # fmt: skip
    p.add_argument("--clear", action="store_true", help="remove every budget first (then apply the other flags)")
    leaf("status", _status, "each replica's power, cap and admission level, and the site's totals")
