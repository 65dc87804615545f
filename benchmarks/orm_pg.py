"""ORM query loop on PostgreSQL: the ratio querywatch adds inside a `watch()`.

Two engines on the same database (psycopg 3), one bare and one instrumented, querying the 20
authors of `bench_authors` by primary key; rounds alternate between them in one process and the
best and median per-query times are compared, so machine drift cancels. Needs PostgreSQL at
QUERYWATCH_BENCH_DSN (default postgres@127.0.0.1:5432/test).

    python benchmarks/orm_pg.py [--queries 500] [--rounds 15] [--url ...]
"""

from __future__ import annotations

import argparse
import contextlib

import sqlalchemy as sa
import structlog
from _common import POSTGRES_URL, Author, Base, build, interleaved, print_ratio, timed
from sqlalchemy.orm import Session

import querywatch


def run(engine: sa.Engine, n: int, watched: bool) -> float:
    stmt = sa.select(Author).where(Author.id == sa.bindparam("i"))
    with Session(engine) as session:
        session.scalars(stmt, {"i": 1}).first()

        def loop() -> None:  # includes opening and closing the unit
            with querywatch.watch("bench") if watched else contextlib.nullcontext():
                for i in range(n):
                    session.scalars(stmt, {"i": i % 20 + 1}).first()

        return timed(loop)[0] / n


def main() -> None:
    # The structlog reporter still runs (its cost is part of the measurement); it prints nowhere.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--url", default=POSTGRES_URL)
    args = parser.parse_args()
    bare = build(args.url)
    watched = sa.create_engine(args.url)
    querywatch.instrument(watched)
    n = args.queries
    results = interleaved(
        args.rounds, {"bare": lambda: run(bare, n, False), "watched": lambda: run(watched, n, True)}
    )
    print(f"SQLAlchemy {sa.__version__}, PostgreSQL ORM loop, {args.rounds} rounds x {n}")
    print_ratio("ORM query loop", results["bare"], results["watched"], per="query")
    Base.metadata.drop_all(bare)


if __name__ == "__main__":
    main()
