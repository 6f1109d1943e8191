"""What one ledger holds: reserve + settle pairs (the two ledger calls a request makes) per second
and their latency, at 1, 8 and 64 concurrent callers, against a fresh ledger.

    .venv/bin/python bench/ledger_ops.py [--ledger PATH_OR_URL] [--callers 1,8,64] [--pairs 2000]
        [--tenants callers|one] [--admission]

Each caller is a thread doing reserve then settle, one request after another; with
`--tenants callers` every caller spends its own tenant's package (a fleet of customers), with
`--tenants one` they all spend one package (the hottest case: every writer waits on one row).
The default ledger is a fresh SQLite file in a temporary directory; `--ledger postgresql://…`
measures a PostgreSQL database instead (it must be empty). After each level the packages must
be charged exactly what was settled (no overspend, nothing left reserved), or the run fails.
`--admission` makes each pair what the ledger service does for a request: check the caller's key
and read its tenant (LedgerService.authenticate), then reserve, then settle.
To compare two versions of the code, run both in one session on one machine
(PYTHONPATH=<other checkout>, `--callers 1`) and take the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

from factory.bench.schema import cpu_model
from factory.metering.ledger import Ledger

FIELDS = dict(prompt_tokens=3, completion_tokens=5, energy_j=1.0, energy_source="modeled",
              cost=Decimal("0.001"), currency="CNY", model="m")  # fmt: skip
TOKENS = 8  # what each settlement charges (prompt + completion)


def level(ledger: Ledger, callers: int, pairs: int, tenants: list[str], tag: str, keys: dict | None = None) -> dict:
    """`pairs` reserve + settle pairs split over `callers` threads: pairs/s and latency. With
    `keys` (tenant -> token), each pair first checks the tenant's key and reads the tenant."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(callers)

    def caller(k: int) -> None:
        tenant = tenants[k % len(tenants)]
        mine = []
        try:
            start.wait()
            for i in range(pairs // callers):
                rid = f"{tag}-{k}-{i}"
                t0 = time.perf_counter()
                if keys is not None:
                    info = ledger.verify_key(keys[tenant])
                    assert info is not None and ledger.get_tenant(info.tenant) is not None
                ledger.reserve(rid, tenant, 10, ttl_s=60)
                ledger.settle(rid, tenant=tenant, **FIELDS)
                mine.append(time.perf_counter() - t0)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} caller(s) failed: {errors[0]!r}")
    latencies.sort()
    return {
        "callers": callers,
        "pairs": len(latencies),
        "pairs_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", default=None, help="SQLite path or postgresql:// URL (default: a fresh file)")
    ap.add_argument("--callers", default="1,8,64")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs per level")
    ap.add_argument("--tenants", choices=("callers", "one"), default="callers")
    ap.add_argument("--admission", action="store_true", help="check the key and read the tenant first, as the service")
    args = ap.parse_args()
    levels = [int(c) for c in args.callers.split(",")]
    target = args.ledger or str(Path(tempfile.mkdtemp()) / "ledger.db")
    with Ledger(target, pool_size=max(5, max(levels))) as ledger:
        where = getattr(ledger, "where", target)  # (older checkouts: the path)
        count = max(levels) if args.tenants == "callers" else 1
        tenants = [f"t{k}" for k in range(count)]
        keys = {} if args.admission else None
        for t in tenants:
            ledger.create_tenant(t)
            ledger.grant_package(t, 10**12)
            if keys is not None:
                keys[t] = ledger.create_key(t)[1]
        level(ledger, 1, 100, tenants, "warm", keys)
        calls = "key + tenant + reserve + settle" if args.admission else "reserve + settle"
        print(f"ledger {where} on {cpu_model()}, tenants: {args.tenants}, a pair: {calls}")
        for n in levels:
            r = level(ledger, n, args.pairs, tenants, f"c{n}", keys)
            print(f"  {n:>3} callers: {r['pairs_per_s']:7.0f} pairs/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  ({r['pairs']} pairs)")  # fmt: skip
        settled = sum(len(ledger.usage(t)) for t in tenants)
        for t in tenants:
            b = ledger.balance(t)
            if b["reserved"] != 0 or b["used"] != TOKENS * len(ledger.usage(t)):
                raise RuntimeError(f"tenant {t} does not balance: {b}")
        print(f"  balanced: {settled} settlements, each package charged exactly what was settled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
