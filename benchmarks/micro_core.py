"""Core micro-benchmark: µs added per statement by querywatch inside a `watch()`.

`conn.execute(select(...))` on in-memory SQLite, bare engine versus instrumented engine, measured
interleaved in one process (rounds alternate, best-of per side) so machine drift cancels.

    python benchmarks/micro_core.py [--statements 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import sqlalchemy as sa
import structlog

import querywatch


def build() -> tuple[sa.Engine, sa.Table]:
    engine = sa.create_engine("sqlite://")
    meta = sa.MetaData()
    table = sa.Table(
        "t", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("x", sa.Text)
    )
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "x": f"row {i}"} for i in range(100)])
    return engine, table


def run(engine: sa.Engine, table: sa.Table, n: int, watched: bool) -> float:
    stmt = sa.select(table.c.id, table.c.x).where(table.c.id == sa.bindparam("i"))
    with engine.connect() as conn:
        conn.execute(stmt, {"i": 1}).all()
        gc.disable()
        try:
            unit = querywatch.watch("bench") if watched else contextlib.nullcontext()
            with unit:  # both sides run the same loop; the timer excludes opening the unit
                t0 = time.perf_counter()
                for i in range(n):
                    conn.execute(stmt, {"i": i % 100}).all()
                elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
    return elapsed / n


def main() -> None:
    # The structlog reporter still runs (its cost is part of the measurement); it prints nowhere.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    bare_engine, bare_table = build()
    outside_engine, outside_table = build()
    watched_engine, watched_table = build()
    querywatch.instrument(outside_engine)
    querywatch.instrument(watched_engine)
    bare: list[float] = []
    outside: list[float] = []
    watched: list[float] = []
    for _ in range(args.rounds):
        bare.append(run(bare_engine, bare_table, args.statements, False))
        outside.append(run(outside_engine, outside_table, args.statements, False))
        watched.append(run(watched_engine, watched_table, args.statements, True))
    print(f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {args.statements}")
    b, mb = min(bare), statistics.median(bare)
    for label, times in (
        ("bare", bare),
        ("instrumented, outside any unit", outside),
        ("instrumented, inside watch()", watched),
    ):
        best, median = min(times), statistics.median(times)
        print(
            f"{label:32} best {best * 1e6:6.2f} µs/stmt ({(best - b) * 1e6:+.2f})   "
            f"median {median * 1e6:6.2f} ({(median - mb) * 1e6:+.2f})"
        )


if __name__ == "__main__":
    main()
