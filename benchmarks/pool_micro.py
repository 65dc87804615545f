"""Pool micro-benchmark: µs added per checkout+checkin cycle by querywatch's pool auditing.

`pool.connect().close()` on a QueuePool of in-memory SQLite connections (the connection is
reused: no DBAPI connect in the loop), bare engine versus instrumented engine, measured
interleaved in one process (rounds alternate, best and median per side) so machine drift cancels.
Three instrumented cases: outside any unit of work, inside a `watch()` (per-unit figures and
the checkout call site), and with a pool observer registered (prometheus multiprocess mode).

    python benchmarks/pool_micro.py [--cycles 5000] [--rounds 15]
"""

from __future__ import annotations

import argparse

import sqlalchemy as sa
from _common import interleaved, pooled_sqlite, print_added, timed

import querywatch
from querywatch import pool as qw_pool


def cycles(engine: sa.Engine, n: int) -> float:
    connect = engine.pool.connect

    def loop() -> None:
        for _ in range(n):
            connect().close()

    return timed(loop)[0] / n


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
    bare = pooled_sqlite()
    watched = pooled_sqlite()
    querywatch.instrument(watched)
    n = args.cycles
    results = interleaved(
        args.rounds,
        {
            "bare pool": lambda: cycles(bare, n),
            "querywatch, no unit": lambda: cycles(watched, n),
            "querywatch, in watch()": lambda: in_unit(watched, n),
            "querywatch + observer": lambda: with_observer(watched, n),
        },
    )
    print(
        f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {n} "
        f"checkout+checkin cycles (QueuePool, SQLite)"
    )
    print_added(results, per="cycle")


if __name__ == "__main__":
    main()
