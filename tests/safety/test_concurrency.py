"""Concurrency on PostgreSQL: 500 concurrent requests, `watch()` jobs in plain threads and a
pool-exhaustion storm in the middle of the load; every unit of work keeps exactly its own figures.

One run drives the whole scenario (the module-scoped `run` fixture) and each test checks one
behaviour of it. What a unit runs follows from its own parameters (`Work`): plain statements,
lazy loads of `Author.books` over k authors, one statement repeated with the same parameters.
So every unit's statement count, pool checkouts and findings are known in advance. Sync
endpoints run in Starlette's threadpool (psycopg 3), async endpoints on the event loop (asyncpg),
jobs in plain threads (psycopg 3). Starts, rendezvous and releases wait on barriers and events,
never on sleeps: the only timed waits are the pool timeouts the storm is made of.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import querywatch
import querywatch.fastapi
from querywatch import Report, _guard
from querywatch import pool as qw_pool
from querywatch.findings import (
    ConnectionLeakFinding,
    DuplicateQueryFinding,
    Finding,
    NPlusOneFinding,
)
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.models import Author, create_schema, seed
from tests.web_apps import asgi_client

pytestmark = pytest.mark.postgres

#: Concurrent requests of the load (half sync, half async endpoints).
LOAD = 500
#: Load responses received before the storm starts.
STORM_AFTER = 150
#: Sync requests that meet the jobs at a barrier, halfway through their unit of work.
MEET = frozenset({40, 160, 300, 460})
#: Async requests that pause halfway until the storm is over.
GATED = frozenset({41, 161, 301, 461})
#: Storm waiters: sync and async requests, and jobs in plain threads.
SYNC_WAITERS = 6
ASYNC_WAITERS = 4
JOB_WAITERS = 1
#: The storm pools: every connection is held while the waiters time out.
STORM_POOL_SIZE = 2
STORM_ASYNC_POOL_SIZE = 1
STORM_TIMEOUT = 0.2
#: Bound of every wait on an event, barrier or thread: reached only when something is broken.
WAIT = 30.0
THRESHOLD = querywatch.Settings().n_plus_one_threshold
AUTHORS = 10
BOOKS_PER_AUTHOR = 3
#: Added to a unit's tag for its second half: other parameters, never a duplicate.
SECOND_HALF = 100_000

POOLS = ("load-sync", "load-async", "storm-sync", "storm-async")
HERE = Path(__file__).name

_PLAIN = sa.select(sa.bindparam("i", type_=sa.Integer) + sa.bindparam("tag", type_=sa.Integer))
_REPEAT = sa.select(sa.bindparam("d", type_=sa.Integer) * 2)


@dataclass(frozen=True)
class Work:
    """What one unit of work runs, and therefore exactly what it must report."""

    n1: int  # plain statements before the pause, on one connection, distinct parameters
    k: int  # authors whose books are lazy-loaded: one SELECT of the authors, then k loads
    n2: int  # plain statements after the pause, on another connection, other parameters
    d: int  # one statement repeated d times with identical parameters, on a third connection
    tag: int

    @property
    def statements(self) -> int:
        return self.n1 + self.n2 + (1 + self.k if self.k else 0) + self.d

    @property
    def checkouts(self) -> int:
        return sum(part > 0 for part in (self.n1, self.k, self.n2, self.d))

    @property
    def findings(self) -> Counter[tuple[str, str, int]]:
        expected: Counter[tuple[str, str, int]] = Counter()
        if self.n1 + self.n2 >= THRESHOLD:
            expected["n_plus_one", "statement_loop", self.n1 + self.n2] += 1
        if self.k >= THRESHOLD:
            expected["n_plus_one", "Author.books", self.k] += 1
        if self.d >= 2:
            expected["duplicate_query", "repeat", self.d] += 1
        return expected

    def author_ids(self) -> list[int]:
        return [(self.tag + j) % AUTHORS + 1 for j in range(self.k)]


@dataclass(frozen=True)
class Planned:
    """One request of the load."""

    index: int
    kind: str  # "sync" or "async"
    work: Work

    @property
    def request_id(self) -> str:
        return f"load-{self.index}"

    @property
    def route(self) -> str:
        return f"/{self.kind}/{{n1}}"

    @property
    def url(self) -> str:
        w = self.work
        url = f"/{self.kind}/{w.n1}?k={w.k}&n2={w.n2}&d={w.d}&tag={w.tag}"
        if self.index in MEET:
            url += "&meet=true"
        if self.index in GATED:
            url += "&gate=true"
        return url


def plan_load() -> list[Planned]:
    rng = random.Random(8)
    return [
        Planned(
            index=i,
            kind="sync" if i % 2 == 0 else "async",
            work=Work(
                n1=rng.randint(0, 4),
                k=rng.choice((0, 0, 1, 3, THRESHOLD, THRESHOLD + 3)),
                n2=rng.randint(0, 4),
                d=rng.choice((0, 0, 1, 2, 3)),
                tag=i,
            ),
        )
        for i in range(LOAD)
    ]


#: Background jobs (name -> work), run in plain threads alongside the load.
JOBS = {
    "job-0": Work(n1=3, k=6, n2=4, d=2, tag=10_000),
    "job-1": Work(n1=2, k=0, n2=1, d=0, tag=10_001),
    "job-2": Work(n1=0, k=8, n2=5, d=3, tag=10_002),
    "job-3": Work(n1=4, k=3, n2=0, d=1, tag=10_003),
}
#: Requests after the storm, on the storm pools and the load pools: (request id, path).
RECOVERY = (
    ("after-storm-sync-0", "/storm/use"),
    ("after-storm-sync-1", "/storm/use"),
    ("after-storm-sync-2", "/storm/use"),
    ("after-storm-async-0", "/storm-async/use"),
    ("after-storm-async-1", "/storm-async/use"),
    ("after-sync", "/sync/2?k=5&n2=0&d=0&tag=7"),
    ("after-async", "/async/2?k=5&n2=0&d=0&tag=7"),
)
AFTER_WORK = Work(n1=2, k=5, n2=0, d=0, tag=7)
#: The one connection leaked on purpose (its request's unit ends with it checked out).
LEAK_ID = "leak-0"


# -- what the units run ---------------------------------------------------------------------


def plain(engine: sa.Engine, n: int, tag: int) -> None:
    if not n:
        return
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(_PLAIN, {"i": i, "tag": tag})


def lazy(engine: sa.Engine, work: Work) -> None:
    if not work.k:
        return
    with Session(engine) as session:
        query = sa.select(Author).where(Author.id.in_(work.author_ids())).order_by(Author.id)
        authors = session.scalars(query).all()
        assert len(authors) == work.k
        for author in authors:
            assert len(author.books) == BOOKS_PER_AUTHOR  # one lazy load per author


def repeat(engine: sa.Engine, d: int, tag: int) -> None:
    if not d:
        return
    with engine.connect() as conn:
        for _ in range(d):
            conn.execute(_REPEAT, {"d": tag})


def run_work(engine: sa.Engine, work: Work, pause: Callable[[], None]) -> None:
    plain(engine, work.n1, work.tag)
    lazy(engine, work)
    pause()
    plain(engine, work.n2, work.tag + SECOND_HALF)
    repeat(engine, work.d, work.tag)


async def plain_async(engine: AsyncEngine, n: int, tag: int) -> None:
    if not n:
        return
    async with engine.connect() as conn:
        for i in range(n):
            await conn.execute(_PLAIN, {"i": i, "tag": tag})


async def lazy_async(engine: AsyncEngine, work: Work) -> None:
    if not work.k:
        return
    async with AsyncSession(engine) as session:
        query = sa.select(Author).where(Author.id.in_(work.author_ids())).order_by(Author.id)
        authors = (await session.scalars(query)).all()
        assert len(authors) == work.k
        for author in authors:
            assert len(await author.awaitable_attrs.books) == BOOKS_PER_AUTHOR


async def repeat_async(engine: AsyncEngine, d: int, tag: int) -> None:
    if not d:
        return
    async with engine.connect() as conn:
        for _ in range(d):
            await conn.execute(_REPEAT, {"d": tag})


async def run_work_async(
    engine: AsyncEngine, work: Work, pause: Callable[[], Awaitable[None]]
) -> None:
    await plain_async(engine, work.n1, work.tag)
    await lazy_async(engine, work)
    await pause()
    await plain_async(engine, work.n2, work.tag + SECOND_HALF)
    await repeat_async(engine, work.d, work.tag)


# -- the app --------------------------------------------------------------------------------


@dataclass
class Engines:
    sync: sa.Engine
    async_: AsyncEngine
    storm: sa.Engine
    storm_async: AsyncEngine

    def named(self) -> dict[str, sa.Engine | AsyncEngine]:
        return dict(zip(POOLS, (self.sync, self.async_, self.storm, self.storm_async), strict=True))


def make_engines() -> Engines:
    # Load pools small enough to be contended, with room for every request; storm pools small
    # enough to exhaust, with a short timeout.
    return Engines(
        sync=sa.create_engine(PSYCOPG_URL, pool_size=4, max_overflow=4, pool_timeout=WAIT),
        async_=create_async_engine(ASYNCPG_URL, pool_size=4, max_overflow=4, pool_timeout=WAIT),
        storm=sa.create_engine(
            PSYCOPG_URL, pool_size=STORM_POOL_SIZE, max_overflow=0, pool_timeout=STORM_TIMEOUT
        ),
        storm_async=create_async_engine(
            ASYNCPG_URL,
            pool_size=STORM_ASYNC_POOL_SIZE,
            max_overflow=0,
            pool_timeout=STORM_TIMEOUT,
        ),
    )


async def warm(engines: Engines) -> None:
    """Open every storm connection, and the dialects' first connection, outside any unit."""
    sync_conns = [engines.storm.connect() for _ in range(STORM_POOL_SIZE)]
    for conn in sync_conns:
        conn.close()
    with engines.sync.connect():
        pass
    async with engines.async_.connect():
        pass
    async with engines.storm_async.connect():
        pass


async def dispose(engines: Engines) -> None:
    engines.sync.dispose()
    engines.storm.dispose()
    await engines.async_.dispose()
    await engines.storm_async.dispose()


@dataclass
class Signals:
    """How the app, the jobs and the driver wait for each other."""

    #: jobs and meeting requests, each halfway through its unit of work
    barrier: threading.Barrier = field(
        default_factory=lambda: threading.Barrier(len(JOBS) + len(MEET), timeout=WAIT)
    )
    storm_over: threading.Event = field(default_factory=threading.Event)
    storm_over_async: asyncio.Event = field(default_factory=asyncio.Event)
    release: threading.Event = field(default_factory=threading.Event)
    release_async: asyncio.Event = field(default_factory=asyncio.Event)
    #: one item per storm holder that has its connection
    held: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    #: every pool timeout the app and the jobs saw raised
    raised: list[BaseException] = field(default_factory=list)
    leaked: list[sa.Connection] = field(default_factory=list)

    def release_everything(self) -> None:
        self.storm_over.set()
        self.storm_over_async.set()
        self.release.set()
        self.release_async.set()


def wait_for(event: threading.Event) -> None:
    if not event.wait(WAIT):
        raise TimeoutError("the scenario's driver never set the event")


def concurrency_app(engines: Engines, signals: Signals) -> FastAPI:
    """The load endpoints (sync and async), the storm endpoints, and the app's own answer to
    an exhausted pool: 503."""
    app = FastAPI()

    @app.exception_handler(sa.exc.TimeoutError)
    async def pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
        signals.raised.append(exc)
        return JSONResponse({"detail": "database busy"}, status_code=503)

    @app.get("/sync/{n1}")
    def sync_work(n1: int, k: int, n2: int, d: int, tag: int, meet: bool = False) -> dict[str, int]:
        work = Work(n1=n1, k=k, n2=n2, d=d, tag=tag)
        run_work(engines.sync, work, signals.barrier.wait if meet else lambda: None)
        return {"statements": work.statements}

    @app.get("/async/{n1}")
    async def async_work(
        n1: int, k: int, n2: int, d: int, tag: int, gate: bool = False
    ) -> dict[str, int]:
        work = Work(n1=n1, k=k, n2=n2, d=d, tag=tag)

        async def pause() -> None:
            if gate:
                await asyncio.wait_for(signals.storm_over_async.wait(), WAIT)

        await run_work_async(engines.async_, work, pause)
        return {"statements": work.statements}

    @app.get("/storm/hold")
    def storm_hold() -> dict[str, str]:
        with engines.storm.connect() as conn:
            conn.execute(_PLAIN, {"i": 0, "tag": -1})
            anyio.from_thread.run_sync(signals.held.put_nowait, "sync")
            wait_for(signals.release)
        return {"storm": "held"}

    @app.get("/storm-async/hold")
    async def storm_async_hold() -> dict[str, str]:
        async with engines.storm_async.connect() as conn:
            await conn.execute(_PLAIN, {"i": 0, "tag": -2})
            signals.held.put_nowait("async")
            await asyncio.wait_for(signals.release_async.wait(), WAIT)
        return {"storm": "held"}

    @app.get("/storm/wait")
    @app.get("/storm/use")
    def storm_use() -> dict[str, str]:
        with engines.storm.connect() as conn:
            conn.execute(_PLAIN, {"i": 1, "tag": -1})
        return {"storm": "served"}

    @app.get("/storm-async/wait")
    @app.get("/storm-async/use")
    async def storm_async_use() -> dict[str, str]:
        async with engines.storm_async.connect() as conn:
            await conn.execute(_PLAIN, {"i": 1, "tag": -2})
        return {"storm": "served"}

    @app.get("/storm/leak")
    def storm_leak() -> dict[str, str]:
        conn = engines.storm.connect()  # never closed by this request: a leak, on purpose
        conn.execute(_PLAIN, {"i": 2, "tag": -1})
        signals.leaked.append(conn)
        return {"storm": "leaked"}

    return app


# -- the storm ------------------------------------------------------------------------------


@dataclass
class Storm:
    """Statuses by role, and a /metrics scrape taken while every storm connection was held."""

    statuses: dict[str, list[int]]
    scrape: str | None


def waiter_job(engines: Engines, signals: Signals, name: str, reports: dict[str, Report]) -> None:
    """A `watch()` job that needs a storm connection and gives up at the pool timeout."""
    with querywatch.watch(name) as report:
        try:
            with engines.storm.connect():
                pass
        except sa.exc.TimeoutError as exc:
            signals.raised.append(exc)
    reports[name] = report


def request_id(rid: str) -> dict[str, str]:
    return {"x-request-id": rid}


async def storm(
    client: httpx.AsyncClient,
    engines: Engines,
    signals: Signals,
    *,
    sync_waiters: int,
    async_waiters: int,
    job_waiters: int = 0,
    job_reports: dict[str, Report] | None = None,
    scrape: bool = False,
) -> Storm:
    """Hold every storm connection; while they are held, send the waiters (and start the
    waiting jobs); release the holders only once every waiter has had its answer."""
    holders = [
        asyncio.create_task(client.get("/storm/hold", headers=request_id(f"hold-{h}")))
        for h in range(STORM_POOL_SIZE)
    ]
    holders += [
        asyncio.create_task(client.get("/storm-async/hold", headers=request_id(f"hold-async-{h}")))
        for h in range(STORM_ASYNC_POOL_SIZE)
    ]
    try:
        for _ in holders:
            await asyncio.wait_for(signals.held.get(), WAIT)
        text = (await client.get("/metrics")).text if scrape else None
        jobs = [
            threading.Thread(
                target=waiter_job, args=(engines, signals, f"storm-job-{j}", job_reports)
            )
            for j in range(job_waiters)
        ]
        for job in jobs:
            job.start()
        waiters = await asyncio.gather(
            *(
                client.get("/storm/wait", headers=request_id(f"wait-{w}"))
                for w in range(sync_waiters)
            ),
            *(
                client.get("/storm-async/wait", headers=request_id(f"wait-async-{w}"))
                for w in range(async_waiters)
            ),
        )
        for job in jobs:
            await asyncio.to_thread(job.join, WAIT)
            assert not job.is_alive()
    finally:
        signals.release.set()
        signals.release_async.set()
    held = await asyncio.gather(*holders)
    return Storm(
        statuses={
            "holder": [r.status_code for r in held],
            "waiter": [r.status_code for r in waiters],
        },
        scrape=text,
    )


# -- the run --------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, have), value in samples.items() if n == name and wanted <= have)


@dataclass
class Run:
    load: list[Planned]
    reports: list[Report]
    job_reports: dict[str, Report]
    statuses: dict[str, int]
    storm: Storm
    done_when_storm_started: int
    done_when_storm_ended: int
    raised: int
    metrics: Samples
    stats: dict[str, qw_pool.PoolStats]
    states: dict[str, qw_pool.PoolState]
    checked_out: dict[str, int]

    def by_request_id(self) -> dict[str, Report]:
        found: dict[str, Report] = {}
        for report in self.reports:
            if report.http is not None:
                rid = report.http.request_id
                assert rid not in found, f"two reports for request {rid}"
                found[rid] = report
        return found


async def drive() -> Run:
    """Seed, start the jobs and the load, storm in the middle, recover; read every figure."""
    engines = make_engines()
    signals = Signals()
    reports: list[Report] = []
    remove = querywatch.add_reporter(reports.append)
    job_reports: dict[str, Report] = {}
    errors: list[BaseException] = []

    def job(name: str, work: Work) -> None:
        def pause() -> None:
            signals.barrier.wait()
            wait_for(signals.storm_over)

        try:
            with querywatch.watch(name) as report:
                run_work(engines.sync, work, pause)
            job_reports[name] = report
        except BaseException as exc:  # re-raised by the driver below
            errors.append(exc)
            signals.barrier.abort()

    threads = [threading.Thread(target=job, args=item) for item in JOBS.items()]
    load = plan_load()
    statuses: dict[str, int] = {}
    done = 0
    storm_start = asyncio.Event()
    marks: dict[str, int] = {}
    try:
        create_schema(engines.sync)
        with Session(engines.sync) as session:
            seed(session, authors=AUTHORS, books_per_author=BOOKS_PER_AUTHOR)
        await warm(engines)
        app = concurrency_app(engines, signals)
        registry = CollectorRegistry()
        querywatch.fastapi.setup(app, engines.named(), registry=registry)
        for thread in threads:
            thread.start()
        async with asgi_client(app) as client:

            async def send(planned: Planned) -> None:
                nonlocal done
                response = await client.get(planned.url, headers=request_id(planned.request_id))
                statuses[planned.request_id] = response.status_code
                done += 1
                if done == STORM_AFTER:
                    storm_start.set()

            async def storm_in_the_middle() -> Storm:
                await storm_start.wait()
                marks["started"] = done
                try:
                    return await storm(
                        client,
                        engines,
                        signals,
                        sync_waiters=SYNC_WAITERS,
                        async_waiters=ASYNC_WAITERS,
                        job_waiters=JOB_WAITERS,
                        job_reports=job_reports,
                        scrape=True,
                    )
                finally:
                    marks["ended"] = done
                    signals.storm_over.set()
                    signals.storm_over_async.set()

            *_, storm_result = await asyncio.wait_for(
                asyncio.gather(*(send(p) for p in load), storm_in_the_middle()), 4 * WAIT
            )
            for thread in threads:
                await asyncio.to_thread(thread.join, WAIT)
            if errors:
                raise errors[0]
            for rid, path in RECOVERY:
                statuses[rid] = (await client.get(path, headers=request_id(rid))).status_code
            statuses[LEAK_ID] = (
                await client.get("/storm/leak", headers=request_id(LEAK_ID))
            ).status_code
            for conn in signals.leaked:
                conn.close()
            metrics = parse((await client.get("/metrics")).text)
        stats: dict[str, qw_pool.PoolStats] = {}
        states: dict[str, qw_pool.PoolState] = {}
        checked_out: dict[str, int] = {}
        for name, engine in engines.named().items():
            found = qw_pool.stats_for(engine)
            assert found is not None
            stats[name], states[name] = found.snapshot(), found.state()
            checked_out[name] = found.checked_out
        return Run(
            load=load,
            reports=reports,
            job_reports=job_reports,
            statuses=statuses,
            storm=storm_result,
            done_when_storm_started=marks["started"],
            done_when_storm_ended=marks["ended"],
            raised=len(signals.raised),
            metrics=metrics,
            stats=stats,
            states=states,
            checked_out=checked_out,
        )
    finally:
        signals.release_everything()
        signals.barrier.abort()
        for thread in threads:
            if thread.ident is not None:
                thread.join(WAIT)
        for conn in signals.leaked:
            conn.close()
        remove()
        for engine in engines.named().values():
            querywatch.uninstrument(engine)
        await dispose(engines)


@pytest.fixture(scope="module")
def run() -> Run:
    """The whole scenario, once per module, with querywatch's internal errors re-raised."""
    require_postgres()
    previous = _guard.raise_internal_errors
    _guard.raise_internal_errors = True
    errors_before = _guard.internal_error_counts()
    try:
        result = asyncio.run(drive())
    finally:
        _guard.raise_internal_errors = previous
    assert _guard.internal_error_counts() == errors_before
    return result


def summary(finding: Finding) -> tuple[str, str, int]:
    if isinstance(finding, NPlusOneFinding):
        return ("n_plus_one", finding.relationship or finding.pattern, finding.count)
    if isinstance(finding, DuplicateQueryFinding):
        return ("duplicate_query", "repeat", finding.count)
    if isinstance(finding, ConnectionLeakFinding):
        return ("connection_leak", finding.pool, finding.connections)
    return (finding.kind, finding.callsite or "", 0)


# -- the tests ------------------------------------------------------------------------------


def test_every_unit_yields_exactly_one_report(run: Run) -> None:
    """Each request and each job of the run is reported once, and nothing else is."""
    requests = {p.request_id for p in run.load} | {rid for rid, _ in RECOVERY} | {LEAK_ID}
    requests |= {f"hold-{h}" for h in range(STORM_POOL_SIZE)}
    requests |= {f"hold-async-{h}" for h in range(STORM_ASYNC_POOL_SIZE)}
    requests |= {f"wait-{w}" for w in range(SYNC_WAITERS)}
    requests |= {f"wait-async-{w}" for w in range(ASYNC_WAITERS)}
    jobs = set(JOBS) | {f"storm-job-{j}" for j in range(JOB_WAITERS)}
    assert set(run.by_request_id()) == requests
    assert Counter(r.name for r in run.reports if r.http is None) == Counter(jobs)
    assert all(r.final for r in run.reports)
    assert len(run.reports) == len(requests) + len(jobs)


def test_each_request_reports_exactly_its_own_statements(run: Run) -> None:
    """Each of 500 concurrent requests (threadpool and event loop) counts only what it ran."""
    by_id = run.by_request_id()
    for planned in run.load:
        report = by_id[planned.request_id]
        assert report.http is not None
        got = (
            report.http.status,
            report.http.route,
            report.statements,
            report.pool.checkouts,
            report.pool.timeouts,
            report.pool.leaked,
        )
        want = (200, planned.route, planned.work.statements, planned.work.checkouts, 0, 0)
        assert got == want, planned
        assert run.statuses[planned.request_id] == 200


def test_findings_land_only_on_the_units_that_caused_them(run: Run) -> None:
    """Each unit's findings (N+1, duplicates, the one leak) are exactly those it caused."""
    by_id = run.by_request_id()
    units = [(by_id[p.request_id], p.work) for p in run.load]
    units += [(run.job_reports[name], work) for name, work in JOBS.items()]
    units += [(by_id[rid], AFTER_WORK) for rid, path in RECOVERY if "/storm" not in path]
    expected = {id(report): work.findings for report, work in units}
    expected[id(by_id[LEAK_ID])] = Counter({("connection_leak", "storm-sync", 1): 1})
    for report in run.reports:  # the storm's holders and waiters cause none
        assert Counter(summary(f) for f in report.findings) == expected.get(id(report), {}), report
    for report, work in units:
        for finding in report.n_plus_one:
            assert finding.callsite is not None
            assert f"{HERE}:" in finding.callsite
            if finding.relationship is not None:
                assert (finding.pattern, finding.phase) == ("lazy_load", "handler")
                assert finding.distinct == work.k
    # the plan does cause each kind of finding, many times over
    planned = Counter(kind for _, work in units for kind, _, _ in work.findings.elements())
    assert planned["n_plus_one"] > 100
    assert planned["duplicate_query"] > 50


def test_jobs_in_threads_count_exactly_their_own_work(run: Run) -> None:
    """`watch()` jobs in plain threads, overlapping the load, report only their own work."""
    for name, work in JOBS.items():
        report = run.job_reports[name]
        assert report in run.reports
        assert (report.kind, report.http) == ("job", None)
        got = (report.statements, report.pool.checkouts, report.pool.timeouts)
        assert got == (work.statements, work.checkouts, 0), name


def test_metric_totals_equal_the_sums_of_the_units(run: Run) -> None:
    """Per route and per job, the Prometheus figures are the sums of the planned units."""
    m = run.metrics
    for kind in ("sync", "async"):
        planned = [p for p in run.load if p.kind == kind]
        route = planned[0].route
        labels = {"route": route, "method": "GET"}
        assert total(m, "querywatch_request_db_statements_count", **labels) == len(planned) + 1
        assert (
            total(m, "querywatch_request_db_statements_sum", **labels)
            == sum(p.work.statements for p in planned) + AFTER_WORK.statements
        )
        works = [p.work for p in planned] + [AFTER_WORK]
        findings = Counter(kind for w in works for kind, _, _ in w.findings.elements())
        assert total(m, "querywatch_n_plus_one_total", route=route) == findings["n_plus_one"]
        assert (
            total(m, "querywatch_duplicate_queries_total", route=route)
            == findings["duplicate_query"]
        )
        lazy = total(m, "querywatch_lazy_loads_total", route=route, phase="handler")
        assert lazy == sum(w.k for w in works)
    # Jobs are labelled by kind, never by name.
    findings = Counter(kind for w in JOBS.values() for kind, _, _ in w.findings.elements())
    assert total(m, "querywatch_n_plus_one_total", route="<job>") == findings["n_plus_one"]
    assert total(m, "querywatch_lazy_loads_total", route="<job>") == sum(w.k for w in JOBS.values())
    durations = "querywatch_db_statement_duration_seconds_count"
    assert total(m, durations) == sum(r.statements for r in run.reports)
    sync_statements = sum(p.work.statements for p in run.load if p.kind == "sync")
    sync_statements += AFTER_WORK.statements + sum(w.statements for w in JOBS.values())
    assert total(m, durations, pool="load-sync") == sync_statements
    assert total(m, "querywatch_db_pool_checkouts_total", pool="load-sync") == sum(
        r.pool.checkouts for r in run.reports if r.name.startswith(("job-", "GET /sync"))
    )
    assert total(m, "querywatch_internal_errors_total") == 0


def test_pool_timeouts_raised_equal_timeouts_counted(run: Run) -> None:
    """Every pool timeout the storm raised is counted once: reports, stats and metric agree."""
    expected = {"storm-sync": SYNC_WAITERS + JOB_WAITERS, "storm-async": ASYNC_WAITERS}
    assert run.raised == sum(expected.values())
    assert sum(r.pool.timeouts for r in run.reports) == run.raised
    by_id = run.by_request_id()
    waiters = [by_id[f"wait-{w}"] for w in range(SYNC_WAITERS)]
    waiters += [by_id[f"wait-async-{w}"] for w in range(ASYNC_WAITERS)]
    waiters += [run.job_reports[f"storm-job-{j}"] for j in range(JOB_WAITERS)]
    for report in waiters:
        assert (report.pool.timeouts, report.pool.checkouts, report.statements) == (1, 0, 0)
        assert report.pool.wait_seconds >= STORM_TIMEOUT
    for name in POOLS:
        counted = run.stats[name].checkout_timeouts_total
        exported = total(run.metrics, "querywatch_db_pool_checkout_timeouts_total", pool=name)
        assert counted == exported == expected.get(name, 0), name
        # a timed-out checkout waited too: the wait histogram holds checkouts and timeouts
        waits = total(run.metrics, "querywatch_db_pool_wait_seconds_count", pool=name)
        assert waits == run.stats[name].checkouts_total + counted, name


def test_timed_out_requests_answer_the_apps_own_503(run: Run) -> None:
    """Requests that hit the pool timeout get the app's 503, and are reported with it."""
    assert run.storm.statuses == {
        "holder": [200] * (STORM_POOL_SIZE + STORM_ASYNC_POOL_SIZE),
        "waiter": [503] * (SYNC_WAITERS + ASYNC_WAITERS),
    }
    by_id = run.by_request_id()
    for rid in [f"wait-{w}" for w in range(SYNC_WAITERS)]:
        assert by_id[rid].http == querywatch.HttpRequest(
            method="GET", route="/storm/wait", path="/storm/wait", status=503, request_id=rid
        )


def test_the_storm_hits_in_the_middle_of_the_load(run: Run) -> None:
    """The storm starts after the first load responses and ends before the load does."""
    assert STORM_AFTER <= run.done_when_storm_started < LOAD - len(GATED)
    # the gated requests and the jobs wait for the storm's end: the load outlives it
    assert run.done_when_storm_ended <= LOAD - len(GATED)


def test_pool_state_is_exported_while_every_storm_connection_is_held(run: Run) -> None:
    """A scrape during the storm shows each storm pool's connections all in use."""
    assert run.storm.scrape is not None
    m = parse(run.storm.scrape)
    for name, size in (("storm-sync", STORM_POOL_SIZE), ("storm-async", STORM_ASYNC_POOL_SIZE)):
        assert total(m, "querywatch_db_pool_connections", pool=name, state="used") == size
        assert total(m, "querywatch_db_pool_connections", pool=name, state="idle") == 0
        assert total(m, "querywatch_db_pool_connections_max", pool=name) == size


def test_the_app_recovers_after_the_storm(run: Run) -> None:
    """After the storm, requests succeed on every pool and no connection stays checked out."""
    by_id = run.by_request_id()
    for rid, path in RECOVERY:
        report = by_id[rid]
        assert run.statuses[rid] == 200, rid
        assert report.pool.timeouts == 0
        expected = AFTER_WORK.statements if path.startswith(("/sync", "/async")) else 1
        assert report.statements == expected, rid
    for name in POOLS:
        state = run.states[name]
        assert (state.used, state.pending, run.checked_out[name]) == (0, 0, 0), name
        assert run.stats[name].checkouts_total == run.stats[name].checkins_total, name


def test_the_only_leak_is_the_one_caused_on_purpose(run: Run) -> None:
    """The connection leaked on purpose is one finding on its own request, nowhere else."""
    leaks = [(r.name, summary(f)) for r in run.reports for f in r.leaks]
    assert leaks == [("GET /storm/leak", ("connection_leak", "storm-sync", 1))]
    assert run.by_request_id()[LEAK_ID].pool.leaked == 1
    exported = {
        labels: value
        for (name, labels), value in run.metrics.items()
        if name == "querywatch_db_pool_leaked_connections_total"
    }
    assert exported == {frozenset({("pool", "storm-sync"), ("route", "/storm/leak")}): 1.0}


async def test_timeouts_answer_the_same_status_without_querywatch(run: Run) -> None:
    """The same app and storm, uninstrumented, answer the very statuses the audited app did."""
    engines = make_engines()
    signals = Signals()
    try:
        await warm(engines)
        app = concurrency_app(engines, signals)
        async with asgi_client(app) as client:
            plain_storm = await storm(client, engines, signals, sync_waiters=2, async_waiters=2)
    finally:
        signals.release_everything()
        await dispose(engines)
    assert {role: set(s) for role, s in plain_storm.statuses.items()} == {
        role: set(s) for role, s in run.storm.statuses.items()
    }
    assert len(signals.raised) == 4


def test_a_checkout_racing_the_previous_checkin_is_counted() -> None:
    """A thread that checks out a connection the moment another thread returns it (before that
    checkin's bookkeeping could run) has its checkout counted in its own unit of work."""
    require_postgres()
    engine = sa.create_engine(PSYCOPG_URL, pool_size=1, max_overflow=0, pool_timeout=WAIT)
    with engine.connect():
        pass  # the one connection is open: the race below is between checkin and checkout
    querywatch.instrument(engine)
    try:
        queue: Any = engine.pool._pool  # type: ignore[attr-defined]
        put = queue.put
        racers: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def racer() -> None:
            try:
                with querywatch.watch("racer") as report, engine.connect():
                    racers.append((report.pool.checkouts, report.pool.max_held))
            except BaseException as exc:  # re-raised in the test's thread below
                errors.append(exc)

        def put_then_race(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            if not racers and not errors:
                # The connection is back in the queue; the returning thread has not gone on.
                thread = threading.Thread(target=racer)
                thread.start()
                thread.join(WAIT)

        queue.put = put_then_race
        with querywatch.watch("returner") as returner, engine.connect():
            pass
        if errors:
            raise errors[0]
        assert racers == [(1, 1)]
        assert (returner.pool.checkouts, returner.pool.leaked) == (1, 0)
        stats = qw_pool.stats_for(engine)
        assert stats is not None
        assert (stats.checkouts_total, stats.checkins_total, stats.checked_out) == (2, 2, 0)
    finally:
        querywatch.uninstrument(engine)
        engine.dispose()
