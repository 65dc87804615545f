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
import os
import statistics
from functools import partial
from typing import Any

import httpx
import sqlalchemy as sa
import structlog
from _common import DSN, Author, asgi_get, interleaved, paired_ratios, postgres_url, reset, timed
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import querywatch.fastapi


def prepare(dsn: str) -> None:
    engine = sa.create_engine(postgres_url("psycopg", dsn))
    reset(engine, authors=20, books_per_author=2)
    engine.dispose()


def build(dsn: str, kind: str, watched: bool) -> FastAPI:
    app = FastAPI()
    if kind == "sync":
        engine: Any = sa.create_engine(postgres_url("psycopg", dsn), pool_size=5)

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
        engine = create_async_engine(postgres_url("asyncpg", dsn), pool_size=5)

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


def http_client(app: FastAPI) -> Any:
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://bench")

    async def get(path: str) -> None:
        response = await client.get(path)
        assert response.status_code == 200, response.text

    return get


def raw_client(app: FastAPI) -> Any:
    async def get(path: str) -> None:
        assert await asgi_get(app, path) == 200

    return get


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--raw", action="store_true", help="raw ASGI calls instead of httpx")
    parser.add_argument("--kinds", default="sync,async")
    parser.add_argument("--dsn", default=DSN, help="user@host:port/db of a PostgreSQL database")
    args = parser.parse_args()
    # JSON lines to /dev/null: the cost of rendering and writing the events is measured.
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=devnull),
        cache_logger_on_first_use=True,
    )
    prepare(args.dsn)
    make_client = raw_client if args.raw else http_client
    loop = asyncio.new_event_loop()

    n: int = args.requests

    def measure(client: Any, path: str) -> float:
        async def requests() -> None:
            for _ in range(n):
                await client(path)

        return timed(lambda: loop.run_until_complete(requests()))[0] / n

    print(f"{'raw ASGI' if args.raw else 'httpx ASGITransport'}, {args.rounds} rounds x "
          f"{args.requests} requests, median of per-round ratios (querywatch / bare)")  # fmt: skip
    print("| endpoint | bare µs/request | querywatch µs/request | added | budget |")
    print("|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        bare = make_client(build(args.dsn, kind, watched=False))
        watched = make_client(build(args.dsn, kind, watched=True))
        for path, budget in (("/nplus1", 0.05), ("/one", 0.10)):
            sides = {
                "bare": partial(measure, bare, path),
                "watched": partial(measure, watched, path),
            }
            interleaved(1, sides)  # warm-up: connections, caches
            times = interleaved(args.rounds, sides)
            ratio = statistics.median(paired_ratios(times["bare"], times["watched"]))
            verdict = "ok" if ratio - 1 <= budget else "OVER"
            print(
                f"| {kind} {path} | {statistics.median(times['bare']) * 1e6:.0f} | "
                f"{statistics.median(times['watched']) * 1e6:.0f} | {(ratio - 1) * 100:+.1f} % | "
                f"≤ {budget * 100:.0f} % {verdict} |"
            )
    loop.close()


if __name__ == "__main__":
    main()
