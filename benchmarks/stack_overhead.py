"""Whole-stack overhead: a FastAPI app with and without `querywatch.fastapi.setup()`.

Middleware + detection + pool tracking + metrics + logs (default settings: only requests with
findings log, as JSON lines into /dev/null) on PostgreSQL, requests sent over httpx's ASGI
transport (or raw ASGI calls with --raw), the two apps measured interleaved in one process
(rounds alternate; the median of per-round ratios) so machine drift cancels.

Endpoints: `/one` (1 statement) and `/nplus1` (1 + 20 lazy loads = 21 statements, an N+1
finding on every request). Sync (psycopg) and async (asyncpg) variants.

    python benchmarks/stack_overhead.py [--rounds 30] [--requests 100] [--raw] [--dsn ...]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from typing import Any

import httpx
import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import querywatch.fastapi

DSN = os.environ.get("QUERYWATCH_BENCH_DSN", "postgres@127.0.0.1:5432/test")


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "stack_bench_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(order_by="Book.id")


class Book(Base):
    __tablename__ = "stack_bench_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("stack_bench_authors.id"))
    title: Mapped[str]


def prepare(dsn: str) -> None:
    engine = sa.create_engine(f"postgresql+psycopg://{dsn}")
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for a in range(20):
            author = Author(id=a + 1, name=f"author {a}")
            author.books = [Book(id=a * 10 + b, title=f"book {b}") for b in range(2)]
            session.add(author)
        session.commit()
    engine.dispose()


def build(dsn: str, kind: str, watched: bool) -> FastAPI:
    app = FastAPI()
    if kind == "sync":
        engine: Any = sa.create_engine(f"postgresql+psycopg://{dsn}", pool_size=5)

        @app.get("/one")
        def one() -> dict[str, Any]:
            with Session(engine) as session:
                return {"name": session.get(Author, 1).name}  # type: ignore[union-attr]

        @app.get("/nplus1")
        def nplus1() -> list[int]:
            with Session(engine) as session:
                authors = session.scalars(sa.select(Author).order_by(Author.id)).all()
                return [len(a.books) for a in authors]

    else:
        engine = create_async_engine(f"postgresql+asyncpg://{dsn}", pool_size=5)

        @app.get("/one")
        async def one_async() -> dict[str, Any]:
            async with AsyncSession(engine) as session:
                author = await session.get(Author, 1)
                return {"name": author.name}  # type: ignore[union-attr]

        @app.get("/nplus1")
        async def nplus1_async() -> list[int]:
            async with AsyncSession(engine) as session:
                authors = (await session.scalars(sa.select(Author).order_by(Author.id))).all()
                return [len(await a.awaitable_attrs.books) for a in authors]

    if watched:
        querywatch.fastapi.setup(app, engine, registry=CollectorRegistry())
    return app


async def measure(client: Any, path: str, n: int) -> float:
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            await client(path)
        return (time.perf_counter() - t0) / n
    finally:
        gc.enable()


def http_client(app: FastAPI) -> Any:
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://bench")

    async def get(path: str) -> None:
        response = await client.get(path)
        assert response.status_code == 200, response.text

    return get


def raw_client(app: FastAPI) -> Any:
    async def get(path: str) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
                 "server": ("bench", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        assert status == 200

    return get


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--raw", action="store_true", help="raw ASGI calls instead of httpx")
    parser.add_argument("--kinds", default="sync,async")
    parser.add_argument("--dsn", default=DSN, help="user@host:port/db of a PostgreSQL database")
    args = parser.parse_args()
    # JSON lines to /dev/null: the cost of rendering and writing the events is measured.
    devnull = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - lives as long as the process
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=devnull),
        cache_logger_on_first_use=True,
    )
    prepare(args.dsn)
    make_client = raw_client if args.raw else http_client
    print(f"{'raw ASGI' if args.raw else 'httpx ASGITransport'}, {args.rounds} rounds x "
          f"{args.requests} requests, median of per-round ratios (querywatch / bare)")  # fmt: skip
    print("| endpoint | bare µs/request | querywatch µs/request | added | budget |")
    print("|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        bare = make_client(build(args.dsn, kind, watched=False))
        watched = make_client(build(args.dsn, kind, watched=True))
        for path, budget in (("/nplus1", 0.05), ("/one", 0.10)):
            for client in (bare, watched):  # warm-up: connections, caches
                await measure(client, path, args.requests)
            ratios, bare_times, watched_times = [], [], []
            for r in range(args.rounds):
                order = [(bare, bare_times), (watched, watched_times)]
                if r % 2:
                    order.reverse()
                for client, times in order:
                    times.append(await measure(client, path, args.requests))
                ratios.append(watched_times[-1] / bare_times[-1])
            ratio = statistics.median(ratios)
            verdict = "ok" if ratio - 1 <= budget else "OVER"
            print(
                f"| {kind} {path} | {statistics.median(bare_times) * 1e6:.0f} | "
                f"{statistics.median(watched_times) * 1e6:.0f} | {(ratio - 1) * 100:+.1f} % | "
                f"≤ {budget * 100:.0f} % {verdict} |"
            )


if __name__ == "__main__":
    asyncio.run(main())
