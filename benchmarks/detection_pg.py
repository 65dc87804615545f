"""Detection benchmark: the cost of full detection on a 21-statement N+1 request on PostgreSQL.

One "request" = `select(Author)` for 20 authors + one lazy load of `author.books` per author
(1 + 20 statements), in a fresh Session, psycopg 3 on 127.0.0.1:5432/test. Bare engine (no
querywatch at all: the ORM hook is removed for the bare rounds) versus an instrumented engine
inside `querywatch.watch()` (statement recording, call sites, lazy-load attribution, detection
at the end of the unit: each request produces one N+1 finding). Rounds alternate in one process
so machine drift cancels; best-of and median per side.

    python benchmarks/detection_pg.py [--requests 200] [--rounds 15] [--url ...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import sqlalchemy as sa
from _common import POSTGRES_URL as URL
from _common import Base, build, request

import querywatch
from querywatch import _orm, reporting


def run(engine: sa.Engine, n: int, watched: bool) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per request."""
    request(engine)  # warm the pool and the compiled cache
    gc.disable()
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        if watched:
            for _ in range(n):
                with querywatch.watch("bench") as report:
                    request(engine)
                assert len(report.n_plus_one) == 1, report
                assert report.statements == 21, report
        else:
            for _ in range(n):
                request(engine)
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--url", default=URL)
    args = parser.parse_args()
    bare_engine = build(args.url)
    watched_engine = sa.create_engine(args.url)
    querywatch.instrument(watched_engine)
    # Findings are the point here, not their log lines: instrument() installed the structlog
    # reporter, which goes again.
    reporting.uninstall()
    bare: list[tuple[float, float]] = []
    watched: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        _orm.uninstall()
        bare.append(run(bare_engine, args.requests, False))
        _orm.ensure_installed()
        watched.append(run(watched_engine, args.requests, True))
    print(
        f"SQLAlchemy {sa.__version__}, PostgreSQL (psycopg), {args.rounds} interleaved rounds x "
        f"{args.requests} requests of 21 statements"
    )
    for label, index in (("wall", 0), ("cpu ", 1)):
        b = [r[index] for r in bare]
        w = [r[index] for r in watched]
        ratios = sorted(wi / bi for wi, bi in zip(w, b, strict=True))
        print(
            f"{label} bare {min(b) * 1e3:7.3f} ms/request (best), querywatch {min(w) * 1e3:7.3f}: "
            f"added {(min(w) / min(b) - 1) * 100:+.1f} % best-vs-best, "
            f"{(statistics.median(ratios) - 1) * 100:+.1f} % median of paired rounds "
            f"({(min(w) - min(b)) * 1e6 / 21:+.1f} µs/statement)"
        )
    Base.metadata.drop_all(bare_engine)


if __name__ == "__main__":
    main()
