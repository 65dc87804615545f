"""Soak: 100,000 requests through a FastAPI app with querywatch mounted; memory must stay flat.

An app built with `querywatch.fastapi.setup()` serves a mix of sync endpoints (threadpool) and
async endpoints, clean ones and N+1 ones (lazy loads of `Author.books`, an N+1 finding on every
request), with many distinct parameter values: primary keys, IN lists of 1 to 60 ids (a new
expanded statement string per length), and a "legacy" endpoint that inlines a value into its SQL
(a distinct statement string on nearly every request, which fills the fingerprint cache and the
call-site memo to their bounds). Requests are raw ASGI calls, several in flight at a time.
structlog renders every event as JSON into a null sink (default settings: each N+1 request
logs its finding and its request event; `--log-requests all` logs every request, about a third
slower), Prometheus records into a fresh `CollectorRegistry`.

Runs on SQLite (sync sqlite + aiosqlite, one file) and on PostgreSQL (psycopg + asyncpg, at
`--dsn`, by default QUERYWATCH_BENCH_DSN; skipped, saying so, when nothing answers there).
Every 10,000 requests it prints: requests done, tracemalloc current size, the same without the
contents of querywatch's bounded caches (they fill and empty by design; their entry counts are
checked against their bounds instead), RSS, the fingerprint cache size, the call-site memo and
code caches, and the internal error counts. Then a single `querywatch.watch()` unit runs 100,000
statements; its exact statement count and the memory it held (tracemalloc peak above the start)
are printed.

Verdict (exit 1 when any fails): growth from the `--warmup` mark (20,000 requests) to the end
under 1 MB (tracemalloc, net of the bounded caches); no internal error; every cache within its
bound; every response 200; the N+1 counter equals the number of N+1 requests and clean routes
have no finding; exactly the requests `log_requests` selects were logged; the
100,000-statement unit counted exactly, holding less than `--unit-budget-mb`.

    python benchmarks/soak.py [--requests 100000] [--concurrency 8] [--warmup 20000]
        [--backends sqlite,postgresql] [--dsn postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import random
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from _common import DSN, Author, Base, Book, postgres_url, reset
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import querywatch
import querywatch.fastapi
from querywatch import _callsite, _guard, _orm, fingerprinting
from querywatch._collection import current_collector

AUTHORS = 2_000
BOOKS_PER_AUTHOR = 3
MB = 1024 * 1024

# With 6,000 books, each lazy load of `Author.books` wants an index (the other benchmarks' few
# books do without).
sa.Index("ix_bench_books_author_id", Book.author_id)


# -- the app ---------------------------------------------------------------------------------

#: route template -> whether every request to it is an N+1
ROUTES = {
    "/authors/{author_id}": False,
    "/authors": True,
    "/books": False,
    "/legacy/{value}": False,
    "/async/authors/{author_id}": False,
    "/async/authors": True,
    "/async/books": False,
    "/async/legacy/{value}": False,
}


def legacy_sql(value: int) -> str:
    # Old code that inlines values: a new statement string per value, one shape.
    return (
        f"SELECT id, title FROM bench_books WHERE id = {value % (AUTHORS * BOOKS_PER_AUTHOR) + 1} "
        f"OR title = 'legacy {value}'"
    )


AUTHOR_NAME = sa.select(Author.name).where(Author.id == sa.bindparam("id"))
# An expanding IN: a new statement string per list length.
BOOK_TITLES = sa.select(Book.title).where(Book.id.in_(sa.bindparam("ids", expanding=True)))


def _keys(ids: str) -> list[int]:
    return [int(i) for i in ids.split(",")]


def build_app(
    engine: sa.Engine,
    async_engine: AsyncEngine,
    registry: CollectorRegistry,
    settings: querywatch.Settings,
) -> FastAPI:
    app = FastAPI()

    # Clean endpoints use Core (one statement, few allocations); the N+1 ones the ORM.
    @app.get("/authors/{author_id}")
    def author(author_id: int) -> str | None:
        with engine.connect() as conn:
            return conn.execute(AUTHOR_NAME, {"id": author_id}).scalar()

    @app.get("/authors")
    def authors(start: int, limit: int) -> list[int]:
        with Session(engine) as session:
            page = session.scalars(
                sa.select(Author).where(Author.id >= start).order_by(Author.id).limit(limit)
            ).all()
            return [len(a.books) for a in page]  # N+1: one lazy load per author

    @app.get("/books")
    def books(ids: str) -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(BOOK_TITLES, {"ids": _keys(ids)}).scalars())

    @app.get("/legacy/{value}")
    def legacy(value: int) -> int:
        with engine.connect() as conn:
            return len(conn.exec_driver_sql(legacy_sql(value)).all())

    @app.get("/async/authors/{author_id}")
    async def author_async(author_id: int) -> str | None:
        async with async_engine.connect() as conn:
            return (await conn.execute(AUTHOR_NAME, {"id": author_id})).scalar()

    @app.get("/async/authors")
    async def authors_async(start: int, limit: int) -> list[int]:
        async with AsyncSession(async_engine) as session:
            page = (
                await session.scalars(
                    sa.select(Author).where(Author.id >= start).order_by(Author.id).limit(limit)
                )
            ).all()
            return [len(await a.awaitable_attrs.books) for a in page]

    @app.get("/async/books")
    async def books_async(ids: str) -> list[str]:
        async with async_engine.connect() as conn:
            return list((await conn.execute(BOOK_TITLES, {"ids": _keys(ids)})).scalars())

    @app.get("/async/legacy/{value}")
    async def legacy_async(value: int) -> int:
        async with async_engine.connect() as conn:
            return len((await conn.exec_driver_sql(legacy_sql(value))).all())

    named: dict[str, sa.Engine | AsyncEngine] = {"sync": engine, "async": async_engine}
    querywatch.fastapi.setup(
        app,
        named,
        registry=registry,
        settings=settings,
    )
    return app


def request_for(rng: random.Random) -> tuple[str, str, bytes]:
    """(route template, path, query string) of one random request."""
    side = "/async" if rng.random() < 0.5 else ""
    kind = rng.choices(["author", "authors", "books", "legacy"], [38, 6, 26, 30])[0]
    if kind == "author":
        author_id = rng.randint(1, AUTHORS)
        return f"{side}/authors/{{author_id}}", f"{side}/authors/{author_id}", b""
    if kind == "authors":
        # 5 or 6 authors, one lazy load each: at the default threshold (5), an N+1 every time.
        query = f"start={rng.randint(1, AUTHORS - 20)}&limit={rng.randint(5, 6)}"
        return f"{side}/authors", f"{side}/authors", query.encode()
    if kind == "books":
        ids = rng.sample(range(1, AUTHORS * BOOKS_PER_AUTHOR + 1), rng.randint(1, 60))
        return f"{side}/books", f"{side}/books", f"ids={','.join(map(str, ids))}".encode()
    value = rng.randint(0, 10**12)
    return f"{side}/legacy/{{value}}", f"{side}/legacy/{value}", b""


async def call(app: Any, path: str, query: bytes, request_id: bytes | None) -> int:
    """One raw ASGI GET; returns the status."""
    headers = [(b"host", b"soak")]
    if request_id is not None:
        headers.append((b"x-request-id", request_id))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "server": ("soak", 80),
        "client": ("127.0.0.1", 1),
    }
    status = 0
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return status


# -- measuring -------------------------------------------------------------------------------


class NullSink(io.StringIO):
    """Where the JSON log lines go: counted, then dropped."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()

    def write(self, text: str) -> int:
        if '"querywatch.request"' in text:
            self.events["querywatch.request"] += 1
        elif '"querywatch.n_plus_one"' in text:
            self.events["querywatch.n_plus_one"] += 1
        elif text.strip():
            self.events["other"] += 1
        return len(text)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def cache_sizes() -> dict[str, tuple[int, int]]:
    """name -> (entries, bound) of every process-wide cache querywatch keeps."""
    return {
        "fingerprints": (
            fingerprinting.cache_len(),
            fingerprinting._cache_size * len(fingerprinting.caches()),  # one per dialect family
        ),
        "callsite_memo": (len(_callsite._memos), _callsite._MAX_MEMOS),
        "library_codes": (len(_callsite._is_library_code), _callsite._MAX_CACHED_CODES),
        "display_names": (len(_callsite._display_names), _callsite._MAX_CACHED_CODES),
        "orm_described": (len(_orm._described), _orm._MAX_DESCRIBED),
    }


def cache_content_bytes() -> int:
    """Bytes held by the entries of the caches that fill and empty by design (the fingerprint
    cache drops its oldest half when full, the call-site memo starts over): counted once each."""
    seen: set[int] = set()
    total = 0

    def add(obj: object) -> None:
        nonlocal total
        if id(obj) not in seen:
            seen.add(id(obj))
            total += sys.getsizeof(obj)

    for cache in fingerprinting.caches():
        for key, result in list(cache.items()):
            add(key)
            add(result)
            add(result[0])
            add(result[1])
        add(cache)
    for statement, memo in list(_callsite._memos.items()):
        add(statement)
        add(memo)
        add(memo.where)  # (the statement's frame, its caller's), formatted
        for frame in memo.where:
            if frame is not None:
                add(frame)
    add(_callsite._memos)
    return total


@dataclass
class Checkpoint:
    requests: int
    traced: int
    net: int
    rss: int


@dataclass
class Run:
    backend: str
    statuses: Counter[int] = field(default_factory=Counter)
    per_route: Counter[str] = field(default_factory=Counter)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def checkpoint(run: Run, done: int, started: float) -> None:
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    net = traced - cache_content_bytes()
    point = Checkpoint(done, traced, net, rss_bytes())
    run.checkpoints.append(point)
    sizes = cache_sizes()
    errors = _guard.internal_error_counts()
    elapsed = time.perf_counter() - started
    caches = " ".join(f"{name}={n}/{bound}" for name, (n, bound) in sizes.items())
    print(
        f"  {done:>7,} requests {elapsed:6.1f} s | tracemalloc {traced / MB:6.2f} MB, "
        f"net of caches {net / MB:6.2f} MB | RSS {point.rss / MB:6.1f} MB | {caches} | "
        f"internal errors {errors or 0}",
        flush=True,
    )
    for name, (n, bound) in sizes.items():
        if n > bound:
            run.problems.append(f"{run.backend}: {name} holds {n} entries, bound {bound}")


async def serve(
    app: Any, run: Run, requests: Iterator[tuple[str, str, bytes]], ids: Iterator[bytes | None]
) -> None:
    """Send requests one after another until the shared iterator is empty."""
    for route, path, query in requests:
        status = await call(app, path, query, next(ids))
        run.statuses[status] += 1
        run.per_route[route] += 1


async def drive(app: Any, run: Run, n: int, concurrency: int, seed: int) -> None:
    rng = random.Random(seed)
    started = time.perf_counter()
    checkpoint(run, 0, started)
    done = 0
    while done < n:
        batch = min(10_000, n - done)
        requests = iter([request_for(rng) for _ in range(batch)])
        # Half the requests bring their own request id (distinct values, bound to the logs).
        ids = iter([rng.randbytes(8).hex().encode() if rng.random() < 0.5 else None
                    for _ in range(batch)])  # fmt: skip
        await asyncio.gather(*(serve(app, run, requests, ids) for _ in range(concurrency)))
        done += batch
        checkpoint(run, done, started)


def verify_metrics(
    run: Run, registry: CollectorRegistry, sink: NullSink, clean_logged: int
) -> None:
    """Responses, Prometheus counts and log events against what was sent. `clean_logged`:
    the number of requests logged when every request is (else 0: only findings log)."""
    problems = run.problems
    if set(run.statuses) != {200}:
        problems.append(f"{run.backend}: statuses {dict(run.statuses)}")
    for route, n_plus_one in ROUTES.items():
        sent = run.per_route[route]
        counted = registry.get_sample_value(
            "querywatch_request_db_statements_count", {"route": route, "method": "GET"}
        )
        if counted != sent:
            problems.append(f"{run.backend}: {route}: {sent} requests, metrics count {counted}")
        findings = registry.get_sample_value("querywatch_n_plus_one_total", {"route": route}) or 0
        if findings != (sent if n_plus_one else 0):
            problems.append(f"{run.backend}: {route}: {sent} requests, {findings} N+1 findings")
        duplicates = registry.get_sample_value(
            "querywatch_duplicate_queries_total", {"route": route}
        )
        if duplicates:
            problems.append(f"{run.backend}: {route}: {duplicates} duplicate-query findings")
    n_plus_one_requests = sum(run.per_route[r] for r, bad in ROUTES.items() if bad)
    logged = sink.events["querywatch.request"]
    expected = clean_logged or n_plus_one_requests
    if logged != expected:
        problems.append(f"{run.backend}: {logged} querywatch.request events, {expected} expected")
    if sink.events["querywatch.n_plus_one"] != n_plus_one_requests:
        problems.append(
            f"{run.backend}: {n_plus_one_requests} N+1 requests, "
            f"{sink.events['querywatch.n_plus_one']} querywatch.n_plus_one events"
        )
    counted = sum(
        registry.get_sample_value("querywatch_n_plus_one_total", {"route": r}) or 0 for r in ROUTES
    )
    print(
        f"  responses {dict(run.statuses)}; N+1 requests {n_plus_one_requests:,}, N+1 findings "
        f"in Prometheus {counted:,.0f}; log events {dict(sink.events)}"
    )


def verdict_memory(run: Run, warmup: int, budget: int) -> None:
    marks = {c.requests: c for c in run.checkpoints}
    start = marks.get(warmup) or run.checkpoints[min(len(run.checkpoints) - 1, 2)]
    end = run.checkpoints[-1]
    growth = end.net - start.net
    raw = end.traced - start.traced
    ok = growth < budget
    print(
        f"  growth {start.requests:,} -> {end.requests:,} requests: {growth / 1024:+.1f} kB "
        f"net of caches ({raw / 1024:+.1f} kB raw tracemalloc, RSS "
        f"{(end.rss - start.rss) / 1024:+.0f} kB); budget {budget / 1024:.0f} kB: "
        f"{'ok' if ok else 'FAIL'}"
    )
    if not ok:
        run.problems.append(f"{run.backend}: memory grew {growth / 1024:.1f} kB after warm-up")


# -- backends --------------------------------------------------------------------------------


def postgres_answers(dsn: str) -> bool:
    hostport = dsn.split("@", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host, int(port or 5432)), timeout=2.0):
            return True
    except OSError:
        return False


def engines(backend: str, dsn: str, workdir: str) -> tuple[sa.Engine, AsyncEngine]:
    if backend == "sqlite":
        path = os.path.join(workdir, "soak.db")
        engine = sa.create_engine(f"sqlite:///{path}", pool_size=8)
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", pool_size=8)
    else:
        engine = sa.create_engine(postgres_url("psycopg", dsn), pool_size=8)
        async_engine = create_async_engine(postgres_url("asyncpg", dsn), pool_size=8)
    return engine, async_engine


async def soak(backend: str, args: argparse.Namespace, workdir: str) -> list[str]:
    print(f"\n== {backend}: {args.requests:,} requests, {args.concurrency} in flight ==")
    engine, async_engine = engines(backend, args.dsn, workdir)
    reset(engine, authors=AUTHORS, books_per_author=BOOKS_PER_AUTHOR)
    registry = CollectorRegistry()
    sink = NullSink()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sink),
        cache_logger_on_first_use=False,
    )
    settings = querywatch.Settings(log_requests=args.log_requests)
    app = build_app(engine, async_engine, registry, settings)
    run = Run(backend)
    try:
        await drive(app, run, args.requests, args.concurrency, args.seed)
        verify_metrics(run, registry, sink, args.requests if args.log_requests == "all" else 0)
        verdict_memory(run, args.warmup, int(args.budget_mb * MB))
        await unit_of_work(run, engine, args)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
        await async_engine.dispose()
    return run.problems


async def unit_of_work(run: Run, engine: sa.Engine, args: argparse.Namespace) -> None:
    """One `watch()` unit of 100,000 statements: distinct parameters on one shape, plus
    inlined-literal statements spread over more shapes than `Settings.max_shapes`."""
    n = args.unit_statements
    one_shape = sa.select(Book.title).where(Book.id == sa.bindparam("i"))
    books = AUTHORS * BOOKS_PER_AUTHOR
    with engine.connect() as conn:
        conn.execute(one_shape, {"i": 1}).all()  # compiled-cache warm-up
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        started = time.perf_counter()
        with querywatch.watch("soak-unit") as report:
            for i in range(n):
                if i % 5:
                    conn.execute(one_shape, {"i": i % books + 1}).all()
                else:  # 20,000 statements over 2,000 shapes (an alias per i % 2000)
                    conn.exec_driver_sql(f"SELECT {i} AS c{i // 5 % 2000}").all()
            collector = current_collector()
            assert collector is not None
            collector.fold()
            held = tracemalloc.get_traced_memory()[1] - base
            shapes, untracked = len(collector.shapes), collector.untracked_statements
        seconds = time.perf_counter() - started
    ok = report.statements == n and held < args.unit_budget_mb * MB
    print(
        f"  one watch() unit: {report.statements:,} statements counted (ran {n:,}) in "
        f"{seconds:.1f} s; {shapes} shapes tracked, {untracked:,} statements beyond max_shapes; "
        f"{len(report.queries)} kept in report.queries; memory held (tracemalloc peak above "
        f"start) {held / MB:.2f} MB; budget {args.unit_budget_mb} MB: {'ok' if ok else 'FAIL'}"
    )
    if report.statements != n:
        run.problems.append(f"{run.backend}: unit counted {report.statements} of {n} statements")
    if held >= args.unit_budget_mb * MB:
        run.problems.append(f"{run.backend}: unit held {held / MB:.2f} MB")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=20_000, help="growth is measured after")
    parser.add_argument("--budget-mb", type=float, default=1.0, help="allowed growth after it")
    parser.add_argument("--unit-statements", type=int, default=100_000)
    parser.add_argument("--unit-budget-mb", type=float, default=4.0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--dsn", default=DSN, help="user@host:port/db of a PostgreSQL database")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--log-requests", choices=["findings", "all"], default="findings")
    args = parser.parse_args()

    tracemalloc.start()
    problems: list[str] = []
    ran = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="querywatch-soak-") as workdir:
        for backend in args.backends.split(","):
            if backend == "postgresql" and not postgres_answers(args.dsn):
                print(f"\n== postgresql: SKIPPED, nothing answers at {args.dsn} ==")
                continue
            problems += await soak(backend, args, workdir)
            ran.append(backend)
    errors = _guard.internal_error_counts()
    if errors:
        problems.append(f"internal errors: {errors}")
    print(
        f"\nbackends run: {', '.join(ran) or 'none'}; total {time.perf_counter() - started:.0f} s"
    )
    if not ran:
        problems.append("no backend ran")
    if problems:
        print(f"VERDICT: FAIL ({len(problems)} problem(s))")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("VERDICT: PASS (memory flat after warm-up, caches within bounds, no internal error)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
