"""What the benchmarks share: their models and data, their database, and how they run rounds.

The benchmarks run as scripts (`python benchmarks/x.py`), with this folder first on `sys.path`:
they import this module as `_common`. PostgreSQL is `QUERYWATCH_BENCH_DSN` (`user@host:port/db`,
default `postgres@127.0.0.1:5432/test`). Every side of a comparison runs once per round, in
`interleaved()` rounds, so that machine drift falls on all sides alike; `timed()` times one run;
`print_added()` and `print_ratio()` print what the rounds found, best and median.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

T = TypeVar("T")

#: The PostgreSQL database of every PostgreSQL benchmark, `user@host:port/db` (trust auth on
#: loopback by default).
DSN = os.environ.get("QUERYWATCH_BENCH_DSN", "postgres@127.0.0.1:5432/test")


def postgres_url(driver: str = "psycopg", dsn: str = DSN) -> str:
    """The SQLAlchemy URL of `dsn` through `driver` (`psycopg` or `asyncpg`)."""
    return f"postgresql+{driver}://{dsn}"


#: The sync (psycopg 3) URL of `DSN`.
POSTGRES_URL = postgres_url()


# -- models and data -------------------------------------------------------------------------


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "bench_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(order_by="Book.id")


class Book(Base):
    __tablename__ = "bench_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("bench_authors.id"))


def seed(session: Session, *, authors: int = 20, books_per_author: int = 3) -> None:
    """Authors 1 to `authors`, with `books_per_author` books each (books numbered from 1)."""
    session.execute(
        sa.insert(Author), [{"id": a, "name": f"author {a}"} for a in range(1, authors + 1)]
    )
    if books_per_author:
        session.execute(
            sa.insert(Book),
            [
                {"id": (a - 1) * books_per_author + k + 1, "title": f"book {a}.{k}", "author_id": a}
                for a in range(1, authors + 1)
                for k in range(books_per_author)
            ],
        )
    session.commit()


def reset(engine: sa.Engine, *, authors: int = 20, books_per_author: int = 3) -> sa.Engine:
    """`engine`, its tables created afresh and holding the `seed()` data."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session, authors=authors, books_per_author=books_per_author)
    return engine


def build(url: str) -> sa.Engine:
    """An engine on `url` with fresh tables and the `seed()` data."""
    return reset(sa.create_engine(url))


def request(engine: sa.Engine) -> int:
    """The 21-statement N+1: every author, then `author.books` lazy-loaded for each."""
    with Session(engine) as session:
        return sum(len(author.books) for author in session.scalars(sa.select(Author)))


def pooled_sqlite() -> sa.Engine:
    """An in-memory SQLite engine on a QueuePool, its one connection already open (and the
    dialect initialised), so that no benchmark loop pays for either."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=5)
    with engine.connect():
        pass
    return engine


async def asgi_get(app: Any, path: str) -> int:
    """One GET of `path`, a raw ASGI call with no HTTP client in the way; returns the status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"bench")], "server": ("bench", 80),
             "client": ("127.0.0.1", 1)}  # fmt: skip
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


# -- rounds ----------------------------------------------------------------------------------


def interleaved(rounds: int, sides: Mapping[str, Callable[[], T]]) -> dict[str, list[T]]:
    """Each side's results, one per round: every round runs every side once, odd rounds in
    reverse order, so that neither drift nor going first favours a side."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            results[name].append(sides[name]())
    return results


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call of `run`, the collector off."""
    gc.collect()
    gc.disable()
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        gc.enable()


def print_added(
    seconds: Mapping[str, Sequence[float]], *, per: str, baseline: str | None = None
) -> None:
    """A line per side: best and median µs per `per`, and what each adds to the baseline's
    best and median (`baseline`: the first side unless named)."""
    base = seconds[baseline or next(iter(seconds))]
    width = max(map(len, seconds))
    for name, values in seconds.items():
        best, median = min(values), statistics.median(values)
        line = f"{name:<{width}}  best {best * 1e6:8.2f}  median {median * 1e6:8.2f} µs/{per}"
        if values is not base:
            line += (
                f"   added best {(best - min(base)) * 1e6:+.2f}"
                f"  median {(median - statistics.median(base)) * 1e6:+.2f}"
            )
        print(line)


def paired_ratios(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """`other / base` round by round (the rounds of `interleaved()`), sorted."""
    return sorted(o / b for b, o in zip(base, other, strict=True))


def print_ratio(
    label: str,
    base: Sequence[float],
    other: Sequence[float],
    *,
    per: str,
    names: tuple[str, str] = ("bare", "querywatch"),
) -> None:
    """One line: best and median µs per `per` of both sides, then `other` against `base`,
    best-vs-best and the median of the paired rounds' ratios."""
    best, median = min(other) / min(base) - 1, statistics.median(paired_ratios(base, other)) - 1
    print(
        f"{label}  {names[0]} best {min(base) * 1e6:8.1f} median "
        f"{statistics.median(base) * 1e6:8.1f} µs/{per}, {names[1]} best "
        f"{min(other) * 1e6:8.1f} median {statistics.median(other) * 1e6:8.1f}: "
        f"{best * 100:+5.1f} % best-vs-best ({(min(other) - min(base)) * 1e6:+.1f} µs), "
        f"{median * 100:+5.1f} % median of paired rounds"
    )
