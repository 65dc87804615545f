from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import settings
from app.models import Item
from app.tests.utils.item import create_random_item


def test_create_item(client: TestClient, superuser_token_headers: dict[str, str]) -> None:
    """A user creates an item, which they own."""
    data = {"title": "Foo", "description": "Fighters"}
    r = client.post(f"{settings.API_V1_STR}/items/", headers=superuser_token_headers, json=data)
    assert r.status_code == 200
    content = r.json()
    assert content["title"] == data["title"]
    assert content["description"] == data["description"]
    assert content["owner"]["email"] == settings.FIRST_SUPERUSER
    assert "id" in content


def test_read_item(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser reads any item, with its owner."""
    item = create_random_item(db)
    r = client.get(f"{settings.API_V1_STR}/items/{item.id}", headers=superuser_token_headers)
    assert r.status_code == 200
    content = r.json()
    assert content["title"] == item.title
    assert content["description"] == item.description
    assert content["id"] == str(item.id)
    assert content["owner_id"] == str(item.owner_id)
    assert content["owner"]["email"] == item.owner.email


def test_read_item_not_found(client: TestClient, superuser_token_headers: dict[str, str]) -> None:
    """Reading an item that does not exist is a 404."""
    r = client.get(f"{settings.API_V1_STR}/items/{uuid.uuid4()}", headers=superuser_token_headers)
    assert r.status_code == 404
    assert r.json()["detail"] == "Item not found"


def test_read_item_not_enough_permissions(
    client: TestClient, normal_user_token_headers: dict[str, str], db: Session
) -> None:
    """A normal user cannot read another user's item."""
    item = create_random_item(db)
    r = client.get(f"{settings.API_V1_STR}/items/{item.id}", headers=normal_user_token_headers)
    assert r.status_code == 400
    assert r.json()["detail"] == "Not enough permissions"


@pytest.fixture
def owners_by_item(db: Session) -> dict[uuid.UUID, str]:
    """Six items, each of its own owner: the owner's email by item id."""
    items = [create_random_item(db) for _ in range(6)]
    return {item.id: item.owner.email for item in items}


def test_read_items(
    client: TestClient,
    superuser_token_headers: dict[str, str],
    owners_by_item: dict[uuid.UUID, str],
) -> None:
    """The superuser lists every item, each with its owner's email."""
    r = client.get(f"{settings.API_V1_STR}/items/", headers=superuser_token_headers)
    assert r.status_code == 200
    content = r.json()
    assert content["count"] == len(content["data"]) >= len(owners_by_item)
    listed = {uuid.UUID(item["id"]): item["owner"]["email"] for item in content["data"]}
    assert owners_by_item.items() <= listed.items()


def test_read_items_paginated(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """`skip` and `limit` page through the items; the count is the total."""
    create_random_item(db)
    create_random_item(db)
    url = f"{settings.API_V1_STR}/items/"
    first = client.get(url, headers=superuser_token_headers, params={"limit": 1}).json()
    second = client.get(url, headers=superuser_token_headers, params={"skip": 1, "limit": 1}).json()
    assert first["count"] == second["count"] >= 2
    assert len(first["data"]) == len(second["data"]) == 1
    assert first["data"][0]["id"] != second["data"][0]["id"]


def test_read_items_normal_user_sees_own(
    client: TestClient, normal_user_token_headers: dict[str, str], db: Session
) -> None:
    """A normal user lists only their own items."""
    create_random_item(db)
    data = {"title": "Mine", "description": "only mine"}
    url = f"{settings.API_V1_STR}/items/"
    assert client.post(url, headers=normal_user_token_headers, json=data).status_code == 200
    content = client.get(url, headers=normal_user_token_headers).json()
    assert content["count"] == len(content["data"]) >= 1
    assert {item["owner"]["email"] for item in content["data"]} == {settings.EMAIL_TEST_USER}


def test_update_item(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser updates an item."""
    item = create_random_item(db)
    data = {"title": "Updated title", "description": "Updated description"}
    r = client.put(
        f"{settings.API_V1_STR}/items/{item.id}", headers=superuser_token_headers, json=data
    )
    assert r.status_code == 200
    content = r.json()
    assert content["title"] == data["title"]
    assert content["description"] == data["description"]
    assert content["id"] == str(item.id)
    assert content["owner_id"] == str(item.owner_id)


def test_update_item_not_found(client: TestClient, superuser_token_headers: dict[str, str]) -> None:
    """Updating an item that does not exist is a 404."""
    data = {"title": "Updated title", "description": "Updated description"}
    r = client.put(
        f"{settings.API_V1_STR}/items/{uuid.uuid4()}", headers=superuser_token_headers, json=data
    )
    assert r.status_code == 404
    assert r.json()["detail"] == "Item not found"


def test_update_item_not_enough_permissions(
    client: TestClient, normal_user_token_headers: dict[str, str], db: Session
) -> None:
    """A normal user cannot update another user's item."""
    item = create_random_item(db)
    data = {"title": "Updated title", "description": "Updated description"}
    r = client.put(
        f"{settings.API_V1_STR}/items/{item.id}", headers=normal_user_token_headers, json=data
    )
    assert r.status_code == 400
    assert r.json()["detail"] == "Not enough permissions"


def test_delete_item(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser deletes an item."""
    item = create_random_item(db)
    item_id = item.id
    r = client.delete(f"{settings.API_V1_STR}/items/{item_id}", headers=superuser_token_headers)
    assert r.status_code == 200
    assert r.json()["message"] == "Item deleted successfully"
    db.expire_all()
    assert db.get(Item, item_id) is None


def test_delete_item_not_found(client: TestClient, superuser_token_headers: dict[str, str]) -> None:
    """Deleting an item that does not exist is a 404."""
    r = client.delete(
        f"{settings.API_V1_STR}/items/{uuid.uuid4()}", headers=superuser_token_headers
    )
    assert r.status_code == 404
    assert r.json()["detail"] == "Item not found"
