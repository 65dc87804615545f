"""Session micro-benchmark: µs added per session-per-request cycle by the leak bookkeeping.

Each cycle is what a request does with its Session: open it, run one statement (the Session's
transaction checks a connection out), close it. QueuePool of in-memory SQLite connections,
measured interleaved in one process (rounds alternate, best and median per side) so machine
drift cancels. The cases isolate what tells leaks apart - the `Session.__init__` stamp and the
`after_begin` listener - from the rest of querywatch:

- bare engine, no querywatch;
- instrumented, no unit of work (the Session hooks installed);
- each cycle its own `watch()` unit, without the Session hooks, then with them.

    python benchmarks/session_micro.py [--cycles 3000] [--rounds 15]
"""

from __future__ import annotations

import argparse

import sqlalchemy as sa
from _common import interleaved, pooled_sqlite, print_added, timed
from sqlalchemy.orm import Session

import querywatch
from querywatch import pool as qw_pool

STATEMENT = sa.text("SELECT 1")


def sessions(engine: sa.Engine, n: int) -> float:
    def loop() -> None:
        for _ in range(n):
            with Session(engine) as session:
                session.execute(STATEMENT)

    return timed(loop)[0] / n


def sessions_in_units(engine: sa.Engine, n: int) -> float:
    watch = querywatch.watch

    def loop() -> None:
        for _ in range(n):
            with watch("GET /items"), Session(engine) as session:
                session.execute(STATEMENT)

    return timed(loop)[0] / n


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
    bare = pooled_sqlite()
    watched = pooled_sqlite()
    querywatch.instrument(watched)
    assert qw_pool.session_hooks_installed()
    n = args.cycles
    results = interleaved(
        args.rounds,
        {
            "bare engine": lambda: sessions(bare, n),
            "querywatch, no unit": lambda: sessions(watched, n),
            "watch(), no Session hooks": lambda: without_session_hooks(watched, n),
            "watch(), Session hooks": lambda: sessions_in_units(watched, n),
        },
    )
    print(
        f"SQLAlchemy {sa.__version__}, {args.rounds} interleaved rounds x {n} "
        f"Session cycles (open, one statement, close; QueuePool, SQLite)"
    )
    print_added(results, per="cycle")
    print("the Session hooks alone, inside watch():")
    hooks = ("watch(), no Session hooks", "watch(), Session hooks")
    print_added({name: results[name] for name in hooks}, per="cycle")


if __name__ == "__main__":
    main()
