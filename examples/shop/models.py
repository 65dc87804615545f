"""The shop's tables: customers place orders of order items, each naming a product."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    email: Mapped[str] = mapped_column(sa.String(200), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.id")


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(20), unique=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    price_cents: Mapped[int]


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customers.id"), index=True)
    placed_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(sa.String(20))
    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list[OrderItem]] = relationship(back_populates="order", order_by="OrderItem.id")


class OrderItem(Base):
    __tablename__ = "order_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("products.id"))
    quantity: Mapped[int]
    unit_price_cents: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="items")
    product: Mapped[Product] = relationship()


CUSTOMERS = 12
PRODUCTS = 10
ORDERS_PER_CUSTOMER = 3


def seed(session: Session) -> None:
    """Create the catalogue, customers and their orders, unless the shop already has customers."""
    if session.scalar(sa.select(sa.func.count()).select_from(Customer)):
        return
    products = [
        Product(id=p, sku=f"SKU-{p:03d}", name=f"Product {p}", price_cents=500 + 250 * p)
        for p in range(1, PRODUCTS + 1)
    ]
    session.add_all(products)
    start = dt.datetime(2024, 1, 1, 9, 0)
    order_id = item_id = 0
    for c in range(1, CUSTOMERS + 1):
        customer = Customer(id=c, name=f"Customer {c}", email=f"customer{c}@example.com")
        session.add(customer)
        for n in range(ORDERS_PER_CUSTOMER):
            order_id += 1
            order = Order(
                id=order_id,
                customer=customer,
                placed_at=start + dt.timedelta(hours=order_id),
                status="shipped" if n else "open",
            )
            for k in range(2):
                item_id += 1
                product = products[(order_id + 3 * k) % PRODUCTS]
                order.items.append(
                    OrderItem(
                        id=item_id,
                        product=product,
                        quantity=1 + k,
                        unit_price_cents=product.price_cents,
                    )
                )
            session.add(order)
    session.commit()
