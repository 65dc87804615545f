"""ORM query loop on PostgreSQL: the ratio querywatch adds inside a `watch()`.

Two engines on the same database (psycopg 3), one bare and one instrumented; rounds alternate
between them in one process and the best and median per-query times are compared, so machine
drift cancels. Needs PostgreSQL at QUERYWATCH_PG_SERVER (default postgres@127.0.0.1:5432); uses (and
creates) the database `querywatch_bench`.

    python benchmarks/orm_pg.py [--queries 500] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import querywatch
from tests.models import Author, create_schema, seed

SERVER = os.environ.get("QUERYWATCH_PG_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432")
URL = f"{SERVER}/querywatch_bench"


def ensure_database() -> None:
    """Benchmarks get their own database, so they never race the test suite's tables."""
    admin = sa.create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM pg_database WHERE datname = 'querywatch_bench'"
        ).first()
        if exists is None:
            conn.exec_driver_sql("CREATE DATABASE querywatch_bench")
    admin.dispose()


def run(engine: sa.Engine, n: int, watched: bool) -> float:
    stmt = sa.select(Author).where(Author.id == sa.bindparam("i"))
    with Session(engine) as session:
        session.scalars(stmt, {"i": 1}).first()
        gc.disable()
        try:
            started = time.perf_counter()  # includes opening and closing the unit
            with querywatch.watch("bench") if watched else contextlib.nullcontext():
                for i in range(n):
                    session.scalars(stmt, {"i": i % 20 + 1}).first()
            elapsed = time.perf_counter() - started
        finally:
            gc.enable()
    return elapsed / n


def main() -> None:
    # The structlog reporter still runs (its cost is part of the measurement); it prints nowhere.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    ensure_database()
    bare = sa.create_engine(URL)
    create_schema(bare)
    with Session(bare) as session:
        seed(session, authors=20)
    watched = sa.create_engine(URL)
    querywatch.instrument(watched)
    b: list[float] = []
    w: list[float] = []
    for _ in range(args.rounds):
        b.append(run(bare, args.queries, False))
        w.append(run(watched, args.queries, True))
    print(
        f"SQLAlchemy {sa.__version__}, PostgreSQL ORM loop, {args.rounds} rounds x {args.queries}"
    )
    print(
        f"bare        best {min(b) * 1e6:8.1f} µs/query  median {statistics.median(b) * 1e6:8.1f}"
    )
    print(
        f"querywatch  best {min(w) * 1e6:8.1f} µs/query  median {statistics.median(w) * 1e6:8.1f}"
    )
    print(
        f"ratio       best {min(w) / min(b):.3f}            "
        f"median {statistics.median(w) / statistics.median(b):.3f}"
    )


if __name__ == "__main__":
    main()
