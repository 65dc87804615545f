from __future__ import annotations

from sqlalchemy.orm import Session

from app import crud
from app.core.security import SCHEME, get_legacy_password_hash, verify_password
from app.models import User, UserCreate, UserUpdate
from app.tests.utils.utils import random_email, random_lower_string


def test_create_user(db: Session) -> None:
    """A created user has a hashed password."""
    email = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=email, password=password)
    user = crud.create_user(session=db, user_create=user_in)
    assert user.email == email
    assert user.hashed_password != password


def test_authenticate_user(db: Session) -> None:
    """The right password authenticates."""
    email = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=email, password=password)
    user = crud.create_user(session=db, user_create=user_in)
    authenticated_user = crud.authenticate(session=db, email=email, password=password)
    assert authenticated_user
    assert user.email == authenticated_user.email


def test_not_authenticate_user(db: Session) -> None:
    """An unknown email does not authenticate."""
    email = random_email()
    password = random_lower_string()
    user = crud.authenticate(session=db, email=email, password=password)
    assert user is None


def test_authenticate_upgrades_legacy_hash(db: Session) -> None:
    """Authenticating a user whose hash is of the old scheme re-hashes the password."""
    email = random_email()
    password = random_lower_string()
    user = crud.create_user(session=db, user_create=UserCreate(email=email, password=password))
    user.hashed_password = get_legacy_password_hash(password)
    db.add(user)
    db.commit()

    authenticated_user = crud.authenticate(session=db, email=email, password=password)
    assert authenticated_user is user
    assert user.hashed_password.startswith(f"{SCHEME}$")


def test_get_user(db: Session) -> None:
    """A created user can be read back by id."""
    password = random_lower_string()
    username = random_email()
    user_in = UserCreate(email=username, password=password, is_superuser=True)
    user = crud.create_user(session=db, user_create=user_in)
    user_2 = db.get(User, user.id)
    assert user_2
    assert user.email == user_2.email
    assert user_2.is_superuser


def test_update_user(db: Session) -> None:
    """Updating the password stores its new hash."""
    password = random_lower_string()
    email = random_email()
    user_in = UserCreate(email=email, password=password, is_superuser=True)
    user = crud.create_user(session=db, user_create=user_in)
    new_password = random_lower_string()
    user_in_update = UserUpdate(password=new_password, is_superuser=True)
    crud.update_user(session=db, db_user=user, user_in=user_in_update)
    user_2 = db.get(User, user.id)
    assert user_2
    assert user.email == user_2.email
    assert verify_password(new_password, user_2.hashed_password) == (True, None)
