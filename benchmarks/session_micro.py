"""Session micro-benchmark: µs added per session-per-request cycle by the leak bookkeeping.

Each cycle is what a request does with its Session: open it, run one statement (the Session's
transaction checks a connection out), close it. QueuePool of in-memory SQLite connections,
measured interleaved in one process (rounds alternate, best-of per side) so machine drift
cancels. The cases isolate what tells leaks apart - the `Session.__init__` stamp and the
`after_begin` listener - from the rest of querywatch:

- bare engine, no querywatch;
- instrumented, no unit of work (the Session hooks installed);
- each cycle its own `watch()` unit, without the Session hooks, then with them.

    python benchmarks/session_micro.py [--cycles 3000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

import querywatch
from querywatch import pool as qw_pool

STATEMENT = sa.text("SELECT 1")


def build() -> sa.Engine:
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=5)
    with engine.connect():
        pass  # open the connection (and initialise the dialect) outside the loop
    return engine


def sessions(engine: sa.Engine, n: int) -> float:
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with Session(engine) as session:
                session.execute(STATEMENT)
        return (time.perf_counter() - t0) / n
    finally:
        gc.enable()


def sessions_in_units(engine: sa.Engine, n: int) -> float:
    watch = querywatch.watch
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with watch("GET /items"), Session(engine) as session:
                session.execute(STATEMENT)
        return (time.perf_counter() - t0) / n
    finally:
        gc.enable()


def without_session_hooks(engine: sa.Engine, n: int) -> float:
    qw_pool._remove_session_hooks()
    try:
        return sessions_in_units(engine, n)
    finally:
        qw_pool._add_session_hooks()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    bare = build()
    watched = build()
    querywatch.instrument(watched)
    assert qw_pool.session_hooks_installed()
    cases: dict[str, tuple[sa.Engine, Callable[[sa.Engine, int], float]]] = {
        "bare engine": (bare, sessions),
        "querywatch, no unit": (watched, sessions),
        "watch(), no Session hooks": (watched, without_session_hooks),
        "watch(), Session hooks": (watched, sessions_in_units),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (engine, fn) in cases.items():
            results[name].append(fn(engine, args.cycles))
    print(
        f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {args.cycles} "
        f"Session cycles (open, one statement, close; QueuePool, SQLite)"
    )
    base_name = "bare engine"
    for name, values in results.items():
        best, median = min(values), statistics.median(values)
        line = f"{name:28} best {best * 1e6:7.2f}  median {median * 1e6:7.2f} µs/cycle"
        if name != base_name:
            base = results[base_name]
            line += (
                f"   vs {base_name}: best {(best - min(base)) * 1e6:+.2f}"
                f"  median {(median - statistics.median(base)) * 1e6:+.2f}"
            )
        if name == "watch(), Session hooks":
            base = results["watch(), no Session hooks"]
            line += (
                f"   (hooks: best {(best - min(base)) * 1e6:+.2f}"
                f"  median {(median - statistics.median(base)) * 1e6:+.2f})"
            )
        print(line)


if __name__ == "__main__":
    main()
