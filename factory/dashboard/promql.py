"""Just enough PromQL and Prometheus text format to check a dashboard against a server: the
metric names a query reads, the names an exposition serves, and every query in a Grafana
dashboard. A scanner, not a parser: it assumes the query is valid PromQL.
"""

from __future__ import annotations

import re

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Numbers and durations: 1e6, 0x1f, .5, 5m, 1h30m, 1_000.
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[a-zA-Z0-9_]*")
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"([^"]*)"|'([^']*)')""")
# Followed by "(label, ...)": a list of label names, not of series.
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Aggregations may put their grouping before the "(" (`sum by (le) (...)`), so an identifier
# followed by "(" is not the only shape a non-metric word has.
_AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
_KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})
# A function is told apart by the "(" after it, so a metric may share a function's name.
_NOT_METRICS = _GROUPING | _AGGREGATIONS | _KEYWORDS
_DIGITS = frozenset("0123456789")
_CLOSER = {"{": "}", "[": "]", "(": ")"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (`X_bucket` for a histogram, as written in the query)."""
    names: set[str] = set()
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "#":  # comment to end of line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif c == "{":  # label matchers; `{__name__="x"}` is the one way they name a metric
            end = _skip_group(expr, i)
            names.update(a or b for a, b in _NAME_MATCHER.findall(expr[i:end]))
            i = end
        elif c == "[":  # range or subquery: durations and Grafana's $__rate_interval
            i = _skip_group(expr, i)
        elif c == "$":  # Grafana variable: $name or ${name}
            i += 1
            if expr.startswith("{", i):
                i = _skip_group(expr, i)
            elif m := _IDENT.match(expr, i):
                i = m.end()
        elif c in _DIGITS or (c == "." and expr[i + 1 : i + 2] in _DIGITS):
            i = _NUMBER.match(expr, i).end()
        elif m := _IDENT.match(expr, i):
            word, i = m.group(), m.end()
            j = _skip_space(expr, i)
            called = expr.startswith("(", j)
            if word.lower() in _GROUPING:
                i = _skip_group(expr, j) if called else i
            elif not called and word.lower() not in _NOT_METRICS:
                names.add(word)
        else:
            i += 1
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Names a query can select from a Prometheus text exposition.

    Every sample name present, and the family name of each counter, gauge or untyped family
    even when it has no samples (in this format a counter's family is already named `X_total`).
    A histogram's or summary's family name is left out: Prometheus stores no series under it,
    only `X_bucket`, `X_sum`, `X_count`.
    """
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE" and parts[3] in ("counter", "gauge", "untyped"):
                names.add(parts[2])
        elif m := _IDENT.match(line):
            names.add(m.group())
    return names


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, rows' nested panels included,
    and ("$variable", selector) for each `label_values(selector, label)` template variable."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    walk(dashboard.get("rows", []))  # schemas before 16 kept panels in rows
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if m := _LABEL_VALUES.match(query):
            out.append((f"${var.get('name', '')}", m.group(1)))
    return out


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _skip_string(s: str, i: int) -> int:
    """Index after the string literal opening at i (backslash escapes, except in `raw`)."""
    quote, i = s[i], i + 1
    while i < len(s) and s[i] != quote:
        i += 2 if s[i] == "\\" and quote != "`" else 1
    return i + 1


def _skip_group(s: str, i: int) -> int:
    """Index after the bracket closing the one at i; strings inside may hold any character."""
    closer, i = _CLOSER[s[i]], i + 1
    while i < len(s) and s[i] != closer:
        i = _skip_string(s, i) if s[i] in "\"'`" else i + 1
    return i + 1
