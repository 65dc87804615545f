"""A small suite whose committed snapshot record must pass on SQLAlchemy 2.0 and 2.1 alike.

`tests/test_snapshots.py` copies it and `shop_suite.querywatch.yml` (its record, written on
SQLAlchemy 2.0) into a `pytester` directory and runs it with `--querywatch-snapshot-strict`.
Its statements are those whose SQL differs between the two versions only in column labels:
`session.get()`, lazy loads, `selectinload()` of a one-to-many, `joinedload()`,
`subqueryload()`, legacy `Query`, attributes reloaded after a commit, and an anonymous
`count(*)` label; two of them run in a request sent through a `TestClient`. To rewrite the
record, on SQLAlchemy 2.0:

    pytest --querywatch-snapshot-update tests/snapshot_fixture/shop_suite.py
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)

import querywatch
from querywatch.middleware import QueryWatchMiddleware

pytestmark = pytest.mark.querywatch_snapshot


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "shop_customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.id")


class Order(Base):
    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_customers.id"))
    customer: Mapped[Customer] = relationship(back_populates="orders")


@pytest.fixture
def engine() -> Iterator[sa.Engine]:
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    querywatch.instrument(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for c in range(1, 4):
            orders = [Order(id=c * 10 + o, status="new") for o in range(2)]
            session.add(Customer(id=c, name=f"customer {c}", orders=orders))
        session.commit()
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


def test_get_and_lazy_load(engine: sa.Engine) -> None:
    with Session(engine) as session:
        customer = session.get(Customer, 1)
        assert customer is not None
        assert len(customer.orders) == 2


def test_eager_loads(engine: sa.Engine) -> None:
    with Session(engine) as session:
        session.scalars(sa.select(Customer).options(selectinload(Customer.orders))).all()
        session.scalars(sa.select(Order).options(joinedload(Order.customer))).all()
        session.scalars(sa.select(Customer).options(subqueryload(Customer.orders))).all()


def test_legacy_query_and_count(engine: sa.Engine) -> None:
    with Session(engine) as session:
        assert session.query(Customer).filter(Customer.id > 1).count() == 2
        assert session.scalar(sa.select(sa.func.count()).select_from(Order)) == 6


def test_reload_after_commit(engine: sa.Engine) -> None:
    with Session(engine) as session:
        order = session.get(Order, 10)
        assert order is not None
        order.status = "paid"
        session.commit()
        assert order.status == "paid"


def test_request(engine: sa.Engine) -> None:
    app = FastAPI()
    app.add_middleware(QueryWatchMiddleware, metrics=False)

    @app.get("/customers/{customer_id}/orders")
    def orders(customer_id: int) -> list[str]:
        with Session(engine) as session:
            customer = session.get(Customer, customer_id)
            return [order.status for order in customer.orders] if customer else []

    with TestClient(app) as client:
        assert client.get("/customers/2/orders").json() == ["new", "new"]
