from __future__ import annotations

from sqlalchemy.orm import Session

from app import crud
from app.models import Item, ItemCreate, ItemUpdate
from app.tests.utils.item import create_random_item
from app.tests.utils.user import create_random_user
from app.tests.utils.utils import random_lower_string


def test_create_item(db: Session) -> None:
    """A created item belongs to its owner."""
    user = create_random_user(db)
    item_in = ItemCreate(title=random_lower_string(), description=random_lower_string())
    item = crud.create_item(session=db, item_in=item_in, owner_id=user.id)
    assert item.title == item_in.title
    assert item.owner_id == user.id
    assert item.owner is user


def test_user_items_relationship(db: Session) -> None:
    """A user's items are listed on the user."""
    item = create_random_item(db)
    assert [i.id for i in item.owner.items] == [item.id]


def test_update_item(db: Session) -> None:
    """An update changes only the fields given."""
    item = create_random_item(db)
    description = item.description
    item = crud.update_item(session=db, db_item=item, item_in=ItemUpdate(title="renamed"))
    assert item.title == "renamed"
    assert item.description == description


def test_delete_item(db: Session) -> None:
    """A deleted item is gone."""
    item = create_random_item(db)
    item_id = item.id
    crud.delete_item(session=db, db_item=item)
    assert db.get(Item, item_id) is None
