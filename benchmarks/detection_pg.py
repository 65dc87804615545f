"""Detection benchmark: the cost of full detection on a 21-statement N+1 request on PostgreSQL.

One "request" = `select(Author)` for 20 authors + one lazy load of `author.books` per author
(1 + 20 statements), in a fresh Session, psycopg 3 on QUERYWATCH_BENCH_DSN (default
postgres@127.0.0.1:5432/test). Bare engine (no
querywatch at all: the ORM hook is removed for the bare rounds) versus an instrumented engine
inside `querywatch.watch()` (statement recording, call sites, lazy-load attribution, detection
at the end of the unit: each request produces one N+1 finding). Rounds alternate in one process
so machine drift cancels; best and median per side, and the median of the paired rounds'
ratios.

    python benchmarks/detection_pg.py [--requests 200] [--rounds 15] [--url ...]
"""

from __future__ import annotations

import argparse

import sqlalchemy as sa
from _common import POSTGRES_URL, Base, build, interleaved, print_ratio, request, timed

import querywatch
from querywatch import _orm, _reporting


def run(engine: sa.Engine, n: int, watched: bool) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per request."""
    request(engine)  # warm the pool and the compiled cache

    def loop() -> None:
        if watched:
            for _ in range(n):
                with querywatch.watch("bench") as report:
                    request(engine)
                assert len(report.n_plus_one) == 1, report
                assert report.statements == 21, report
        else:
            for _ in range(n):
                request(engine)

    wall, cpu = timed(loop)
    return wall / n, cpu / n


def bare(engine: sa.Engine, n: int) -> tuple[float, float]:
    _orm.uninstall()  # no querywatch at all
    return run(engine, n, False)


def watched(engine: sa.Engine, n: int) -> tuple[float, float]:
    _orm.ensure_installed()
    return run(engine, n, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--url", default=POSTGRES_URL)
    args = parser.parse_args()
    bare_engine = build(args.url)
    watched_engine = sa.create_engine(args.url)
    querywatch.instrument(watched_engine)
    # Findings are the point here, not their log lines: instrument() installed the structlog
    # reporter, which goes again.
    _reporting.uninstall()
    n = args.requests
    results = interleaved(
        args.rounds,
        {"bare": lambda: bare(bare_engine, n), "watched": lambda: watched(watched_engine, n)},
    )
    print(
        f"SQLAlchemy {sa.__version__}, PostgreSQL (psycopg), {args.rounds} interleaved rounds x "
        f"{n} requests of 21 statements"
    )
    for label, index in (("wall", 0), ("cpu ", 1)):
        b = [t[index] for t in results["bare"]]
        w = [t[index] for t in results["watched"]]
        print_ratio(label, b, w, per="request")
        print(f"     added {(min(w) - min(b)) * 1e6 / 21:+.1f} µs/statement (best-vs-best)")
    Base.metadata.drop_all(bare_engine)


if __name__ == "__main__":
    main()
