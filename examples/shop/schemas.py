"""Response models. They read ORM objects (`from_attributes`), which is where hidden lazy loads
happen: a relationship the handler did not load is loaded while the response is serialised."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ORMModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProductOut(ORMModel):
    id: int
    sku: str
    name: str
    price_cents: int


class OrderItemOut(ORMModel):
    id: int
    quantity: int
    unit_price_cents: int
    product: ProductOut


class OrderOut(ORMModel):
    id: int
    status: str
    customer_id: int
    items: list[OrderItemOut]


class CustomerOut(BaseModel):
    id: int
    name: str
    orders: int


class CustomerSummary(BaseModel):
    id: int
    name: str
    open_orders: int
    lifetime_orders: int


class Revenue(BaseModel):
    since: str
    revenue_cents: int


class Quote(BaseModel):
    product_ids: list[int]
    total_cents: int
