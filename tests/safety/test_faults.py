"""Fault injection: with any one querywatch component failing on every call, a FastAPI app
answers exactly as it does without querywatch, writes the same rows, and
`querywatch_internal_errors_total{component}` counts each failure.

The switch is `querywatch._guard.injected_faults`: every hook and reporter calls `maybe_fail`
with its component name, which raises `InjectedFault` inside the guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import DetachedInstanceError

import querywatch
import querywatch.fastapi
from querywatch import _collection, _guard
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.models import Author, Base, Book
from tests.web_apps import AuthorOut

AUTHORS = 5
BOOKS_PER_AUTHOR = 2

#: Every component with a fault switch: the label values of `querywatch_internal_errors_total`.
COMPONENTS = (
    "engine",
    "orm",
    "pool",
    "collector",
    "detection",
    "structlog",
    "metrics",
    "reporter",
    "middleware",
    "fastapi",
)


class Boom(RuntimeError):
    """The app's own error, turned into a 418 by its exception handler."""


class NewAuthor(BaseModel):
    name: str
    books: int


class NewBook(BaseModel):
    author_id: int
    title: str


#: (method, path, JSON body): every kind of thing querywatch watches, in one sequence.
SCENARIO: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", "/authors", None),  # lazy loads while the response is serialized: an N+1
    ("POST", "/authors", {"name": "new author", "books": 3}),  # a write (executemany)
    ("GET", "/async/authors", None),  # async lazy loads through awaitable_attrs: an N+1
    ("POST", "/async/books", {"author_id": 1, "title": "async book"}),  # an async write
    ("GET", "/duplicate", None),  # the same statement twice: a duplicate query
    ("GET", "/detached", None),  # a lazy load after the session closed, caught: 409
    ("GET", "/handled", None),  # the app's own exception, handled: 418
    ("GET", "/unhandled", None),  # an unhandled exception: 500
    ("GET", "/leak", None),  # a connection checked out and kept past the request
    ("GET", "/authors", None),  # the N+1 again, over the rows written above
)
#: Requests whose endpoint raises out of the app (no response passes through the middleware).
UNHANDLED = 1
#: Requests whose endpoint returns data for FastAPI to serialize (not a Response).
SERIALIZED = 7
#: Lazy loads the scenario runs, after-close attempts included: 5 + 6 + 1 + 6.
ORM_LOADS = AUTHORS + (AUTHORS + 1) + 1 + (AUTHORS + 1)


@dataclass
class Databases:
    engine: sa.Engine
    async_engine: AsyncEngine
    url: str

    async def reseed(self) -> None:
        """Fresh tables with the same authors and books (ids from the database, in order)."""
        await self.async_engine.dispose()
        self.engine.dispose()
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as s:
            for a in range(AUTHORS):
                books = [Book(title=f"book {a}.{b}") for b in range(BOOKS_PER_AUTHOR)]
                s.add(Author(name=f"author {a}", books=books))
                s.flush()
            s.commit()
        with self.engine.connect():  # the dialect's first-connect queries are not the app's
            pass
        async with self.async_engine.connect():
            pass

    def rows(self) -> list[tuple[Any, ...]]:
        """Every author and book row, in order: what the app wrote."""
        plain = sa.create_engine(self.url)
        try:
            with plain.connect() as conn:
                authors = conn.execute(sa.text("SELECT id, name FROM authors ORDER BY id"))
                books = conn.execute(sa.text("SELECT id, title, author_id FROM books ORDER BY id"))
                return [*authors, *books]
        finally:
            plain.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    """A sync and an async engine on one freshly seeded database (SQLite file, or PostgreSQL
    through psycopg 3 and asyncpg); uninstrumented."""
    if request.param == "postgresql":
        require_postgres()
        url, async_url = PSYCOPG_URL, ASYNCPG_URL
    else:
        path = tmp_path / "faults.db"
        url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    db = Databases(sa.create_engine(url), create_async_engine(async_url), url)
    await db.reseed()
    yield db
    engine, async_engine = db.engine, db.async_engine
    for instrumented in (engine, async_engine):
        querywatch.uninstrument(instrumented)
    await async_engine.dispose()
    engine.dispose()


def build_app(db: Databases, leaked: list[sa.Connection]) -> FastAPI:
    """The app under test: nothing in it knows about querywatch."""
    app = FastAPI()
    engine, async_engine = db.engine, db.async_engine

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    @app.exception_handler(Boom)
    async def on_boom(request: Request, exc: Boom) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=418)

    @app.get("/authors", response_model=list[AuthorOut])
    def authors(db: Session = Depends(session)) -> Any:  # noqa: B008
        return db.scalars(sa.select(Author).order_by(Author.id)).all()

    @app.post("/authors")
    def add_author(body: NewAuthor, db: Session = Depends(session)) -> dict[str, int]:  # noqa: B008
        author = Author(name=body.name)
        author.books = [Book(title=f"{body.name} {i}") for i in range(body.books)]
        db.add(author)
        db.commit()
        return {"id": author.id}

    @app.get("/async/authors")
    async def async_authors() -> list[dict[str, Any]]:
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            found = (await s.scalars(sa.select(Author).order_by(Author.id))).all()
            return [
                {"id": a.id, "books": [b.title for b in await a.awaitable_attrs.books]}
                for a in found
            ]

    @app.post("/async/books")
    async def add_book(body: NewBook) -> dict[str, int]:
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            book = Book(author_id=body.author_id, title=body.title)
            s.add(book)
            await s.commit()
            return {"id": book.id}

    @app.get("/duplicate")
    def duplicate(db: Session = Depends(session)) -> dict[str, int]:  # noqa: B008
        first = db.scalar(sa.select(sa.func.count(Author.id)))
        second = db.scalar(sa.select(sa.func.count(Author.id)))
        return {"authors": first or 0, "again": second or 0}

    @app.get("/detached")
    def detached() -> JSONResponse:
        with Session(engine) as s:
            author = s.get(Author, 1)
        try:
            _ = author.books  # type: ignore[union-attr]
        except DetachedInstanceError as exc:
            return JSONResponse({"error": type(exc).__name__}, status_code=409)
        return JSONResponse({"error": None})

    @app.get("/handled")
    def handled(db: Session = Depends(session)) -> None:  # noqa: B008
        db.scalar(sa.select(Author.name).where(Author.id == 1))
        raise Boom("handled by the app")

    @app.get("/unhandled")
    def unhandled(db: Session = Depends(session)) -> None:  # noqa: B008
        db.scalar(sa.select(Author.name).where(Author.id == 2))
        raise RuntimeError("not handled by the app")

    @app.get("/leak")
    def leak() -> dict[str, int]:
        conn = engine.connect()
        conn.execute(sa.select(1))
        leaked.append(conn)
        return {"leaked": len(leaked)}

    return app


@dataclass
class Outcome:
    responses: list[tuple[int, bytes, list[tuple[str, str]]]]
    rows: list[tuple[Any, ...]]


#: Headers querywatch adds on purpose; everything else must be the app's own, unchanged.
OWN_HEADERS = {"x-request-id", "server-timing"}


async def drive(app: FastAPI, db: Databases) -> Outcome:
    """Send the scenario, in order; what the client saw and what the database holds after."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    responses = []
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for method, path, body in SCENARIO:
            response = await client.request(method, path, json=body)
            headers = sorted(
                (k, v) for k, v in response.headers.items() if k.lower() not in OWN_HEADERS
            )
            responses.append((response.status_code, response.content, headers))
    return Outcome(responses, db.rows())


class EventCounts:
    """Cursor executions, checkouts and checkins of both engines, read from SQLAlchemy's own
    events: how often the engine and pool hooks ran."""

    def __init__(self, *engines: sa.Engine) -> None:
        self.statements = 0
        self.pool_calls = 0
        for engine in engines:
            event.listen(engine, "before_cursor_execute", self._statement)
            event.listen(engine, "checkout", self._pool_call)
            event.listen(engine, "checkin", self._pool_call)

    def _statement(self, *args: Any) -> None:
        self.statements += 1

    def _pool_call(self, *args: Any) -> None:
        self.pool_calls += 1


async def run(db: Databases, *, instrumented: bool, registry: CollectorRegistry) -> Outcome:
    leaked: list[sa.Connection] = []
    app = build_app(db, leaked)
    if instrumented:
        querywatch.fastapi.setup(
            app, {"main": db.engine, "async": db.async_engine}, registry=registry
        )
    try:
        return await drive(app, db)
    finally:
        for conn in leaked:
            conn.close()


def expected_failures(component: str, counts: EventCounts, reporters: int) -> int:
    """How many times `component`'s hook runs in the scenario, so fails once each."""
    requests = len(SCENARIO)
    return {
        "engine": counts.statements,
        "pool": counts.pool_calls,
        "orm": ORM_LOADS,
        "collector": requests,
        "detection": requests,
        "structlog": requests,
        "metrics": requests,
        # every registered reporter: structlog, Prometheus and the test's own
        "reporter": requests * reporters,
        # response start (headers) and finalisation, except where the app raised past us
        "middleware": 2 * requests - UNHANDLED,
        "fastapi": SERIALIZED,
    }[component]


def internal_errors(registry: CollectorRegistry) -> dict[str, float]:
    return {
        component: registry.get_sample_value(
            "querywatch_internal_errors_total", {"component": component}
        )
        or 0.0
        for component in COMPONENTS
    }


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_failing_component_leaves_the_app_unchanged_and_is_counted(
    databases: Databases, component: str
) -> None:
    """With `component` raising on every call, the app's responses, status codes, bodies and
    database writes equal an uninstrumented run's, and each failure is counted under its
    component (and no other component fails)."""
    baseline = await run(databases, instrumented=False, registry=CollectorRegistry())
    await databases.reseed()

    registry = CollectorRegistry()
    counts = EventCounts(databases.engine, databases.async_engine.sync_engine)
    _guard.injected_faults = frozenset({component})
    faulty = await run(databases, instrumented=True, registry=registry)
    _guard.injected_faults = frozenset()

    assert faulty.responses == baseline.responses
    assert faulty.rows == baseline.rows
    expected = {c: 0.0 for c in COMPONENTS}
    reporters = len(_collection._reporters)
    expected[component] = float(expected_failures(component, counts, reporters))
    assert internal_errors(registry) == expected


async def test_the_scenario_produces_every_finding_kind_when_nothing_fails(
    databases: Databases, reports: list[querywatch.Report]
) -> None:
    """Without faults the scenario triggers what the fault runs silence: N+1s, a duplicate,
    a lazy load after close and a leak (so each hook really runs in the matrix)."""
    await run(databases, instrumented=True, registry=CollectorRegistry())
    kinds = {finding.kind for report in reports for finding in report.findings}
    assert kinds >= {"n_plus_one", "duplicate_query", "lazy_load_after_close", "connection_leak"}
