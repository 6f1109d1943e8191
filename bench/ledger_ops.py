"""What the ledger costs per request: one reservation and one settlement (the two ledger calls a
request makes), one after the other on one thread, against a fresh ledger.

    .venv/bin/python bench/ledger_ops.py [--ledger PATH_OR_URL] [--requests 2000] [--rounds 3]

The default ledger is a fresh SQLite file in a temporary directory; `--ledger postgresql://…`
measures a PostgreSQL database instead (it must be empty: a tenant `bench` is created in it).
Prints the median of the rounds in ms per reserve + settle; to compare two versions of the code,
run both in one session on one machine (PYTHONPATH=<other checkout>) and take the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from factory.bench.schema import cpu_model
from factory.metering.ledger import Ledger

FIELDS = dict(tenant="bench", prompt_tokens=3, completion_tokens=5, energy_j=1.0, energy_source="modeled",
              cost=Decimal("0.001"), currency="CNY", model="m")  # fmt: skip


def one_round(ledger: Ledger, tag: str, n: int) -> float:
    """Seconds per reserve + settle over `n` requests."""
    t0 = time.perf_counter()
    for i in range(n):
        ledger.reserve(f"{tag}-{i}", "bench", 10, ttl_s=60)
        ledger.settle(f"{tag}-{i}", **FIELDS)
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", default=None, help="SQLite path or postgresql:// URL (default: a fresh file)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    target = args.ledger or str(Path(tempfile.mkdtemp()) / "ledger.db")
    with Ledger(target) as ledger:
        ledger.create_tenant("bench")
        ledger.grant_package("bench", 10**12)
        one_round(ledger, "warm", 100)
        per = sorted(one_round(ledger, f"r{k}", args.requests) for k in range(args.rounds))
        where = getattr(ledger, "where", target)  # (older checkouts: the path)
    ms = statistics.median(per) * 1e3
    print(f"ledger {where} on {cpu_model()}: {ms:.2f} ms per reserve + settle "
          f"(median of {args.rounds} rounds of {args.requests}; {1e3 / ms:.0f} requests/s on one thread)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
