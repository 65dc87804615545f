"""The shop, sync variant: plain `def` endpoints on a `Session`, audited by querywatch.

Every mistake has a fixed twin next to it; each docstring says what querywatch reports. Run it:

    uvicorn --app-dir examples --factory shop.app:app_from_env
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import ResponseValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

import querywatch
import querywatch.fastapi
from shop.db import database_url, engine_options, prepare
from shop.logs import configure_logging
from shop.models import Customer, Order, OrderItem, Product
from shop.schemas import CustomerOut, CustomerSummary, OrderOut, Quote, Revenue

RECENT_ORDERS = 20


@dataclass(frozen=True)
class Reports:
    """The reporting helpers' state: sessions of the `reports` pool, and the leaky cache."""

    sessions: sessionmaker[Session]
    cache: dict[dt.date, tuple[Session, int]]


def create_app(
    url: str | None = None,
    *,
    settings: querywatch.Settings | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the shop on `url` (default: `DATABASE_URL`, else `examples/shop.db`), seeded."""
    parsed = database_url(url)
    prepare(parsed)
    engine = sa.create_engine(parsed, **engine_options(parsed))
    reports_engine = sa.create_engine(parsed, **engine_options(parsed, reports=True))

    app = FastAPI(title="querywatch example shop (sync)")
    app.state.sessions = sessionmaker(engine, expire_on_commit=False)
    app.state.report_sessions = sessionmaker(reports_engine)
    app.state.report_cache = {}
    app.state.engines = (engine, reports_engine)
    # One line: instrument both engines (named: the `pool` label), add the middleware, serve
    # /metrics.
    querywatch.fastapi.setup(
        app, {"shop": engine, "reports": reports_engine}, settings=settings, registry=registry
    )
    app.include_router(router)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Database errors (and response models that hit one) answer a JSON 500 instead of an
    unhandled exception, which would also make uvicorn drop the keep-alive connection."""

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        cause = exc
        if isinstance(exc, ResponseValidationError):
            errors = exc.errors()
            cause_name = str(errors[0].get("ctx", {}).get("error", "")).split(":")[0]
            return JSONResponse({"error": cause_name or "ResponseValidationError"}, 500)
        return JSONResponse({"error": type(cause).__name__}, 500)

    app.add_exception_handler(SQLAlchemyError, database_error)
    app.add_exception_handler(ResponseValidationError, database_error)


def app_from_env() -> FastAPI:
    """The uvicorn factory: logging configured from the environment, then `create_app()`."""
    configure_logging()
    return create_app(settings=querywatch.Settings.from_env())


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed after the response has been serialised."""
    with request.app.state.sessions() as session:
        yield session


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    """The factory of the `shop` pool, for helpers that open their own sessions."""
    factory: sessionmaker[Session] = request.app.state.sessions
    return factory


def get_reports(request: Request) -> Reports:
    """The reporting helpers' state: the `reports` pool's session factory and the cache."""
    return Reports(request.app.state.report_sessions, request.app.state.report_cache)


DB = Annotated[Session, Depends(get_session)]
Sessions = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]
ReportsDep = Annotated[Reports, Depends(get_reports)]
ProductIds = Annotated[str, Query(pattern=r"^\d+(,\d+)*$", examples=["1,2,3,4,5,6"])]


def _ids(product_ids: str) -> list[int]:
    return [int(part) for part in product_ids.split(",")]


router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness for the container healthcheck. No database, no findings."""
    return {"status": "ok"}


# --- N+1 in the handler -------------------------------------------------------------------


@router.get("/customers/n-plus-one", response_model=list[CustomerOut])
def customers_n_plus_one(session: DB) -> list[CustomerOut]:
    """Mistake: `len(customer.orders)` lazy-loads each customer's orders, one query each.

    querywatch reports `querywatch.n_plus_one` (relationship `Customer.orders`, pattern
    `lazy_load`, phase `handler`, 12 loads) and counts it in `querywatch_n_plus_one_total`.
    """
    customers = session.scalars(sa.select(Customer).order_by(Customer.id)).all()
    return [CustomerOut(id=c.id, name=c.name, orders=len(c.orders)) for c in customers]


@router.get("/customers", response_model=list[CustomerOut])
def customers(session: DB) -> list[CustomerOut]:
    """Fix: `selectinload(Customer.orders)` loads every customer's orders in one query.

    querywatch reports nothing: 2 statements whatever the number of customers.
    """
    query = sa.select(Customer).options(selectinload(Customer.orders)).order_by(Customer.id)
    customers = session.scalars(query).all()
    return [CustomerOut(id=c.id, name=c.name, orders=len(c.orders)) for c in customers]


# --- N+1 while the response model is built ------------------------------------------------


@router.get("/orders/recent/lazy", response_model=list[OrderOut])
def recent_orders_lazy(session: DB) -> list[Order]:
    """Mistake: the handler returns ORM orders and `OrderOut` reads `order.items` (and each
    item's `product`) while FastAPI serialises the response: hidden lazy loads.

    querywatch reports `querywatch.n_plus_one` for `Order.items` with phase
    `serialization`, and `querywatch_lazy_loads_total{phase="serialization"}` grows.
    """
    query = sa.select(Order).order_by(Order.placed_at.desc()).limit(RECENT_ORDERS)
    return list(session.scalars(query))


@router.get("/orders/recent", response_model=list[OrderOut])
def recent_orders(session: DB) -> list[Order]:
    """Fix: load what the response model reads, in the query: 3 statements, no finding."""
    query = (
        sa.select(Order)
        .options(selectinload(Order.items).selectinload(OrderItem.product))
        .order_by(Order.placed_at.desc())
        .limit(RECENT_ORDERS)
    )
    return list(session.scalars(query))


# --- Lazy load after the session closed ---------------------------------------------------


def load_order_detached(sessions: sessionmaker[Session], order_id: int) -> Order | None:
    """Mistake: a helper with its own short session returns the order after closing it."""
    with sessions() as session:
        return session.get(Order, order_id)


def load_order(sessions: sessionmaker[Session], order_id: int) -> Order | None:
    """Fix: load the items and products the caller will read before the session closes."""
    with sessions() as session:
        options = selectinload(Order.items).selectinload(OrderItem.product)
        return session.get(Order, order_id, options=[options])


@router.get("/orders/{order_id}/detached", response_model=OrderOut)
def order_detached(sessions: Sessions, order_id: int) -> Order | None:
    """Mistake: `OrderOut` reads `order.items` on a detached order; SQLAlchemy raises
    `DetachedInstanceError` and the request fails with 500.

    querywatch reports `querywatch.lazy_load_after_close` (`Order.items`, error
    `DetachedInstanceError`) and counts `querywatch_lazy_loads_after_close_total`.
    """
    return load_order_detached(sessions, order_id)


@router.get("/orders/{order_id}", response_model=OrderOut)
def order(sessions: Sessions, order_id: int) -> Order | None:
    """Fix: the helper eager-loads what the response needs. No finding."""
    return load_order(sessions, order_id)


# --- A loop of session.get() --------------------------------------------------------------


@router.get("/quote/get-loop", response_model=Quote)
def quote_get_loop(session: DB, product_ids: ProductIds) -> Quote:
    """Mistake: `session.get(Product, id)` per id, one SELECT each.

    querywatch reports `querywatch.n_plus_one` (pattern `statement_loop`, the products
    SELECT by primary key, with its call site) once there are 5 or more ids.
    """
    ids = _ids(product_ids)
    total = 0
    for product_id in ids:
        product = session.get(Product, product_id)
        total += product.price_cents if product is not None else 0
    return Quote(product_ids=ids, total_cents=total)


@router.get("/quote", response_model=Quote)
def quote(session: DB, product_ids: ProductIds) -> Quote:
    """Fix: one `SELECT ... WHERE id IN (...)` for every id. No finding."""
    ids = _ids(product_ids)
    prices = session.scalars(sa.select(Product.price_cents).where(Product.id.in_(ids)))
    return Quote(product_ids=ids, total_cents=sum(prices))


# --- The same query twice -----------------------------------------------------------------


def find_customer(session: Session, customer_id: int) -> Customer:
    return session.scalars(sa.select(Customer).where(Customer.id == customer_id)).one()


def count_orders(session: Session, customer_id: int, status: str | None) -> int:
    customer = find_customer(session, customer_id)  # the mistake: looked up again
    query = sa.select(sa.func.count()).where(Order.customer_id == customer.id)
    if status is not None:
        query = query.where(Order.status == status)
    return session.scalar(query) or 0


@router.get("/customers/{customer_id}/summary/duplicate", response_model=CustomerSummary)
def customer_summary_duplicate(session: DB, customer_id: int) -> CustomerSummary:
    """Mistake: each helper looks the customer up again with the same query.

    querywatch reports `querywatch.duplicate_query` (the customers SELECT, 3 times with
    identical parameters) and counts `querywatch_duplicate_queries_total`.
    """
    customer = find_customer(session, customer_id)
    return CustomerSummary(
        id=customer.id,
        name=customer.name,
        open_orders=count_orders(session, customer_id, "open"),
        lifetime_orders=count_orders(session, customer_id, None),
    )


@router.get("/customers/{customer_id}/summary", response_model=CustomerSummary)
def customer_summary(session: DB, customer_id: int) -> CustomerSummary:
    """Fix: look the customer up once and count both figures in one query. No finding."""
    customer = find_customer(session, customer_id)
    open_count = sa.func.count().filter(Order.status == "open")
    row = session.execute(
        sa.select(open_count, sa.func.count()).where(Order.customer_id == customer.id)
    ).one()
    return CustomerSummary(
        id=customer.id, name=customer.name, open_orders=row[0], lifetime_orders=row[1]
    )


# --- A helper that leaks its session (on the small `reports` pool) ------------------------

revenue_query = (
    sa.select(sa.func.coalesce(sa.func.sum(OrderItem.quantity * OrderItem.unit_price_cents), 0))
    .join(Order, Order.id == OrderItem.order_id)
    .where(Order.placed_at >= sa.bindparam("since"))
)


def revenue_report_leaky(reports: Reports, since: dt.date) -> int:
    """Mistake: the report keeps its session open "to load details later" and is cached,
    so its connection never returns to the pool."""
    cache = reports.cache
    if since not in cache:
        session = reports.sessions()
        since_at = dt.datetime.combine(since, dt.time())
        cache[since] = (session, session.scalar(revenue_query, {"since": since_at}) or 0)
    return cache[since][1]


@router.get("/reports/revenue/leaky", response_model=Revenue)
def revenue_leaky(reports: ReportsDep, since: dt.date) -> Revenue:
    """Mistake: every new `since` leaks a connection of the `reports` pool (2 connections).

    querywatch reports `querywatch.connection_leak` (pool `reports`, the helper's call
    site) and counts `querywatch_db_pool_leaked_connections_total`. With both connections
    leaked the next new `since` waits 0.5 s and fails with 500: `querywatch.pool_timeout`
    and `querywatch_db_pool_checkout_timeouts_total` (the pool-exhausted alert).
    """
    return Revenue(since=since.isoformat(), revenue_cents=revenue_report_leaky(reports, since))


@router.get("/reports/revenue", response_model=Revenue)
def revenue(reports: ReportsDep, since: dt.date) -> Revenue:
    """Fix: the session is a context manager; the connection is back when it ends."""
    with reports.sessions() as session:
        since_at = dt.datetime.combine(since, dt.time())
        cents = session.scalar(revenue_query, {"since": since_at}) or 0
    return Revenue(since=since.isoformat(), revenue_cents=cents)


@router.post("/reports/release")
def release_reports(reports: ReportsDep) -> dict[str, int]:
    """Demo reset: close the sessions the leaky helper kept (their connections return)."""
    cache = reports.cache
    released = len(cache)
    for session, _ in cache.values():
        session.close()
    cache.clear()
    return {"released": released}
