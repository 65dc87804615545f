"""App factories for the middleware, metrics, reporting and FastAPI tests: every call builds a
fresh app (never a shared module-level one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from tests.models import Author


class Boom(RuntimeError):
    """The app's own exception: must reach the caller unchanged."""


_STATEMENT = sa.select(sa.bindparam("i", type_=sa.Integer) + sa.bindparam("tag", type_=sa.Integer))


def run_statements(engine: sa.Engine, n: int, tag: int = 0) -> None:
    """`n` distinct statements (different parameters, so never a duplicate)."""
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(_STATEMENT, {"i": i, "tag": tag})


async def run_statements_async(engine: AsyncEngine, n: int, tag: int = 0) -> None:
    async with engine.connect() as conn:
        for i in range(n):
            await conn.execute(_STATEMENT, {"i": i, "tag": tag})


class BookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    title: str


class AuthorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    books: list[BookOut]


def fastapi_app(engine: sa.Engine, async_engine: AsyncEngine | None = None) -> FastAPI:
    """A FastAPI app: sync and async statement endpoints, a router included with a prefix, a
    mounted sub-app, an endpoint that raises, and a response model built from ORM objects.
    The engines are connected once first: a dialect's first-connect queries are not the app's."""
    warm(engine)
    app = FastAPI()

    @app.get("/items/{n}")
    def items(n: int, tag: int = 0) -> dict[str, int]:
        run_statements(engine, n, tag)
        return {"n": n}

    if async_engine is not None:

        @app.get("/async/items/{n}")
        async def async_items(n: int, tag: int = 0) -> dict[str, int]:
            await run_statements_async(async_engine, n, tag)
            return {"n": n}

    @app.get("/boom")
    def boom() -> None:
        run_statements(engine, 1)
        raise Boom("the app's own error")

    @app.get("/context")
    async def context() -> dict[str, Any]:
        import structlog

        return dict(structlog.contextvars.get_contextvars())

    def session() -> Iterator[Session]:
        with Session(engine) as s:
            yield s

    @app.get("/authors", response_model=list[AuthorOut])
    def authors(db: Session = Depends(session)) -> Any:  # noqa: B008
        # Books are not loaded here: building AuthorOut lazy-loads them, after we return.
        return db.scalars(sa.select(Author).order_by(Author.id)).all()

    @app.get("/authors-in-handler", response_model=list[AuthorOut])
    def authors_in_handler(db: Session = Depends(session)) -> Any:  # noqa: B008
        found = db.scalars(sa.select(Author).order_by(Author.id)).all()
        for author in found:
            _ = author.books  # lazy loads inside the endpoint
        return found

    router = APIRouter()

    @router.get("/things/{thing_id}")
    def thing(thing_id: int) -> dict[str, int]:
        run_statements(engine, 1)
        return {"id": thing_id}

    app.include_router(router, prefix="/v1")

    sub = FastAPI()

    @sub.get("/s/{q}")
    def sub_item(q: str) -> dict[str, str]:
        run_statements(engine, 2)
        return {"q": q}

    app.mount("/sub", sub)
    return app


def warm(engine: sa.Engine) -> None:
    with engine.connect():
        pass


def starlette_app(engine: sa.Engine) -> Starlette:
    """A plain Starlette app: a route with a parameter and a mounted route."""
    warm(engine)

    def items(request: Request) -> JSONResponse:
        n = int(request.path_params["n"])
        run_statements(engine, n)
        return JSONResponse({"n": n})

    async def deep(request: Request) -> JSONResponse:
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/items/{n:int}", items),
            Mount("/m/{tenant}", routes=[Route("/x/{y}", deep)]),
        ]
    )


async def client(app: Any, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, **kwargs)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def asgi_client(app: Any, **transport_options: Any) -> httpx.AsyncClient:
    """An httpx client that calls `app` in-process over ASGI."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport_options), base_url="http://t"
    )
