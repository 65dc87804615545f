"""Core micro-benchmark: µs added per statement by querywatch inside a `watch()`.

`conn.execute(select(...))` on in-memory SQLite (the 100 rows of `bench_authors`), bare engine
versus instrumented engine, measured interleaved in one process (rounds alternate, best and
median per side) so machine drift cancels.

    python benchmarks/micro_core.py [--statements 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib

import sqlalchemy as sa
import structlog
from _common import Author, interleaved, print_added, reset, timed

import querywatch

ROWS = 100


def build() -> sa.Engine:
    return reset(sa.create_engine("sqlite://"), authors=ROWS, books_per_author=0)


def run(engine: sa.Engine, n: int, watched: bool) -> float:
    table = Author.__table__
    stmt = sa.select(table.c.id, table.c.name).where(table.c.id == sa.bindparam("i"))
    with engine.connect() as conn:
        conn.execute(stmt, {"i": 1}).all()

        def loop() -> None:
            for i in range(n):
                conn.execute(stmt, {"i": i % ROWS + 1}).all()

        unit = querywatch.watch("bench") if watched else contextlib.nullcontext()
        with unit:  # both sides run the same loop; the timer excludes opening the unit
            return timed(loop)[0] / n


def main() -> None:
    # The structlog reporter still runs (its cost is part of the measurement); it prints nowhere.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    bare, outside, watched = build(), build(), build()
    querywatch.instrument(outside)
    querywatch.instrument(watched)
    n = args.statements
    results = interleaved(
        args.rounds,
        {
            "bare": lambda: run(bare, n, False),
            "instrumented, outside any unit": lambda: run(outside, n, False),
            "instrumented, inside watch()": lambda: run(watched, n, True),
        },
    )
    print(f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {n}")
    print_added(results, per="stmt")


if __name__ == "__main__":
    main()
