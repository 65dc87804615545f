"""The shop, async variant: `async def` endpoints on an `AsyncSession`, audited by querywatch.

Same database and models as `shop.app` (aiosqlite for SQLite files, psycopg 3 async for
PostgreSQL). In async code a lazy load cannot run implicitly at all: it raises `MissingGreenlet`.
Run it:

    uvicorn --app-dir examples --factory shop.async_app:app_from_env
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

import querywatch
import querywatch.fastapi
from shop.app import add_error_handlers
from shop.db import async_database_url, engine_options, prepare
from shop.logs import configure_logging
from shop.models import Customer, Product
from shop.schemas import CustomerOut, Quote


def create_app(
    url: str | None = None,
    *,
    settings: querywatch.Settings | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the async shop on `url` (default: `DATABASE_URL`, else `examples/shop.db`)."""
    parsed = async_database_url(url)
    prepare(parsed)
    engine = create_async_engine(parsed, **engine_options(parsed))
    app = FastAPI(title="querywatch example shop (async)")
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    app.state.engines = (engine,)
    querywatch.fastapi.setup(app, {"shop": engine}, settings=settings, registry=registry)
    app.include_router(router)
    add_error_handlers(app)
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory: logging configured from the environment, then `create_app()`."""
    configure_logging()
    return create_app(settings=querywatch.Settings.from_env())


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, closed after the response has been serialised."""
    async with request.app.state.sessions() as session:
        yield session


DB = Annotated[AsyncSession, Depends(get_session)]
ProductIds = Annotated[str, Query(pattern=r"^\d+(,\d+)*$", examples=["1,2,3,4,5,6"])]

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness for the container healthcheck. No database, no findings."""
    return {"status": "ok"}


@router.get("/customers/lazy", response_model=list[CustomerOut])
async def customers_lazy(session: DB) -> list[CustomerOut]:
    """Mistake: `len(customer.orders)` in async code: SQLAlchemy cannot lazy-load here and
    raises `MissingGreenlet`; the request fails with 500.

    querywatch reports `querywatch.lazy_load_after_close` (`Customer.orders`, error
    `MissingGreenlet`) and counts `querywatch_lazy_loads_after_close_total`.
    """
    customers = (await session.scalars(sa.select(Customer).order_by(Customer.id))).all()
    return [CustomerOut(id=c.id, name=c.name, orders=len(c.orders)) for c in customers]


@router.get("/customers/awaitable-attrs", response_model=list[CustomerOut])
async def customers_awaitable_attrs(session: DB) -> list[CustomerOut]:
    """Mistake: `await customer.awaitable_attrs.orders` makes the lazy load legal, and an N+1.

    querywatch reports `querywatch.n_plus_one` (relationship `Customer.orders`, pattern
    `lazy_load`, 12 loads) and counts it in `querywatch_n_plus_one_total`.
    """
    customers = (await session.scalars(sa.select(Customer).order_by(Customer.id))).all()
    return [
        CustomerOut(id=c.id, name=c.name, orders=len(await c.awaitable_attrs.orders))
        for c in customers
    ]


@router.get("/customers", response_model=list[CustomerOut])
async def customers(session: DB) -> list[CustomerOut]:
    """Fix: `selectinload(Customer.orders)`: 2 statements, no finding."""
    query = sa.select(Customer).options(selectinload(Customer.orders)).order_by(Customer.id)
    customers = (await session.scalars(query)).all()
    return [CustomerOut(id=c.id, name=c.name, orders=len(c.orders)) for c in customers]


@router.get("/quote/get-loop", response_model=Quote)
async def quote_get_loop(session: DB, product_ids: ProductIds) -> Quote:
    """Mistake: `await session.get(Product, id)` per id, one SELECT each.

    querywatch reports `querywatch.n_plus_one` (pattern `statement_loop`) with 5 or more ids.
    """
    ids = [int(part) for part in product_ids.split(",")]
    total = 0
    for product_id in ids:
        product = await session.get(Product, product_id)
        total += product.price_cents if product is not None else 0
    return Quote(product_ids=ids, total_cents=total)


@router.get("/quote", response_model=Quote)
async def quote(session: DB, product_ids: ProductIds) -> Quote:
    """Fix: one `SELECT ... WHERE id IN (...)`. No finding."""
    ids = [int(part) for part in product_ids.split(",")]
    prices = await session.scalars(sa.select(Product.price_cents).where(Product.id.in_(ids)))
    return Quote(product_ids=ids, total_cents=sum(prices))
