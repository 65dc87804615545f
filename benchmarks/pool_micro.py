"""Pool micro-benchmark: µs added per checkout+checkin cycle by querywatch's pool auditing.

`pool.connect().close()` on a QueuePool of in-memory SQLite connections (the connection is
reused: no DBAPI connect in the loop), bare engine versus instrumented engine, measured
interleaved in one process (rounds alternate, best-of per side) so machine drift cancels.
Three instrumented cases: outside any unit of work, inside a `watch()` (per-unit figures and
the checkout call site), and with a pool observer registered (prometheus multiprocess mode).

    python benchmarks/pool_micro.py [--cycles 5000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa

import querywatch
from querywatch import pool as qw_pool


def build() -> sa.Engine:
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=5)
    with engine.connect():
        pass  # open the connection (and initialise the dialect) outside the loop
    return engine


def cycles(engine: sa.Engine, n: int) -> float:
    connect = engine.pool.connect
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            connect().close()
        return (time.perf_counter() - t0) / n
    finally:
        gc.enable()


def in_unit(engine: sa.Engine, n: int) -> float:
    with querywatch.watch("bench"):
        return cycles(engine, n)


def with_observer(engine: sa.Engine, n: int) -> float:
    def observer(stats: qw_pool.PoolStats) -> None:
        stats.state()

    remove = qw_pool.add_observer(observer)
    try:
        return cycles(engine, n)
    finally:
        remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    bare = build()
    watched = build()
    querywatch.instrument(watched)
    cases: dict[str, tuple[sa.Engine, Callable[[sa.Engine, int], float]]] = {
        "bare pool": (bare, cycles),
        "querywatch, no unit": (watched, cycles),
        "querywatch, in watch()": (watched, in_unit),
        "querywatch + observer": (watched, with_observer),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (engine, fn) in cases.items():
            results[name].append(fn(engine, args.cycles))
    base_best = min(results["bare pool"])
    base_median = statistics.median(results["bare pool"])
    print(
        f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {args.cycles} "
        f"checkout+checkin cycles (QueuePool, SQLite)"
    )
    for name, values in results.items():
        best, median = min(values), statistics.median(values)
        added = ""
        if name != "bare pool":
            added = (
                f"   added best {(best - base_best) * 1e6:+.2f}"
                f"  median {(median - base_median) * 1e6:+.2f} µs/cycle"
            )
        print(f"{name:24} best {best * 1e6:6.2f}  median {median * 1e6:6.2f} µs/cycle{added}")


if __name__ == "__main__":
    main()
