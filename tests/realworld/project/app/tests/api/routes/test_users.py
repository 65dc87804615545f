from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import crud
from app.core.config import settings
from app.core.security import verify_password
from app.models import User, UserCreate
from app.tests.utils.user import user_authentication_headers
from app.tests.utils.utils import random_email, random_lower_string


def test_get_users_superuser_me(
    client: TestClient, superuser_token_headers: dict[str, str]
) -> None:
    """The superuser reads their own account."""
    r = client.get(f"{settings.API_V1_STR}/users/me", headers=superuser_token_headers)
    current_user = r.json()
    assert current_user
    assert current_user["is_active"] is True
    assert current_user["is_superuser"]
    assert current_user["email"] == settings.FIRST_SUPERUSER


def test_get_users_normal_user_me(
    client: TestClient, normal_user_token_headers: dict[str, str]
) -> None:
    """A normal user reads their own account."""
    r = client.get(f"{settings.API_V1_STR}/users/me", headers=normal_user_token_headers)
    current_user = r.json()
    assert current_user
    assert current_user["is_active"] is True
    assert current_user["is_superuser"] is False
    assert current_user["email"] == settings.EMAIL_TEST_USER


def test_create_user_new_email(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser creates a user."""
    username = random_email()
    password = random_lower_string()
    data = {"email": username, "password": password}
    r = client.post(f"{settings.API_V1_STR}/users/", headers=superuser_token_headers, json=data)
    assert 200 <= r.status_code < 300
    created_user = r.json()
    user = crud.get_user_by_email(session=db, email=username)
    assert user
    assert user.email == created_user["email"]


def test_get_existing_user(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser reads any user by id."""
    username = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=username, password=password)
    user = crud.create_user(session=db, user_create=user_in)
    user_id = user.id
    r = client.get(f"{settings.API_V1_STR}/users/{user_id}", headers=superuser_token_headers)
    assert 200 <= r.status_code < 300
    api_user = r.json()
    existing_user = crud.get_user_by_email(session=db, email=username)
    assert existing_user
    assert existing_user.email == api_user["email"]


def test_get_existing_user_current_user(client: TestClient, db: Session) -> None:
    """A normal user reads their own account by id."""
    username = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=username, password=password)
    user = crud.create_user(session=db, user_create=user_in)
    user_id = user.id

    headers = user_authentication_headers(client=client, email=username, password=password)
    r = client.get(f"{settings.API_V1_STR}/users/{user_id}", headers=headers)
    assert 200 <= r.status_code < 300
    api_user = r.json()
    assert api_user["email"] == username


def test_get_existing_user_permissions_error(
    client: TestClient, normal_user_token_headers: dict[str, str]
) -> None:
    """A normal user cannot read another user."""
    r = client.get(f"{settings.API_V1_STR}/users/{uuid.uuid4()}", headers=normal_user_token_headers)
    assert r.status_code == 403
    assert r.json() == {"detail": "The user doesn't have enough privileges"}


def test_create_user_existing_username(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """Creating a user with a taken email is refused."""
    username = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=username, password=password)
    crud.create_user(session=db, user_create=user_in)
    data = {"email": username, "password": password}
    r = client.post(f"{settings.API_V1_STR}/users/", headers=superuser_token_headers, json=data)
    created_user = r.json()
    assert r.status_code == 400
    assert "_id" not in created_user


def test_create_user_by_normal_user(
    client: TestClient, normal_user_token_headers: dict[str, str]
) -> None:
    """A normal user cannot create users."""
    data = {"email": random_email(), "password": random_lower_string()}
    r = client.post(f"{settings.API_V1_STR}/users/", headers=normal_user_token_headers, json=data)
    assert r.status_code == 403


def test_retrieve_users(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser lists the users, with their count."""
    for _ in range(2):
        user_in = UserCreate(email=random_email(), password=random_lower_string())
        crud.create_user(session=db, user_create=user_in)

    r = client.get(f"{settings.API_V1_STR}/users/", headers=superuser_token_headers)
    all_users = r.json()

    assert len(all_users["data"]) > 1
    assert all_users["count"] == len(all_users["data"])
    for item in all_users["data"]:
        assert "email" in item


def test_retrieve_users_paginated(
    client: TestClient, superuser_token_headers: dict[str, str]
) -> None:
    """`skip` and `limit` page through the users; the count is the total."""
    r = client.get(
        f"{settings.API_V1_STR}/users/", headers=superuser_token_headers, params={"limit": 1}
    )
    first = r.json()
    r = client.get(
        f"{settings.API_V1_STR}/users/",
        headers=superuser_token_headers,
        params={"skip": 1, "limit": 1},
    )
    second = r.json()
    assert first["count"] == second["count"] > 1
    assert len(first["data"]) == len(second["data"]) == 1
    assert first["data"][0]["id"] != second["data"][0]["id"]


def test_update_user(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser renames a user."""
    username = random_email()
    password = random_lower_string()
    user_in = UserCreate(email=username, password=password)
    user = crud.create_user(session=db, user_create=user_in)

    data = {"full_name": "Updated_full_name"}
    r = client.patch(
        f"{settings.API_V1_STR}/users/{user.id}", headers=superuser_token_headers, json=data
    )
    assert r.status_code == 200
    updated_user = r.json()
    assert updated_user["full_name"] == "Updated_full_name"

    user_db = db.scalars(select(User).where(User.email == username)).first()
    assert user_db
    db.refresh(user_db)
    assert user_db.full_name == "Updated_full_name"


def test_update_user_password(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """The superuser sets a user's password, which is stored hashed."""
    user_in = UserCreate(email=random_email(), password=random_lower_string())
    user = crud.create_user(session=db, user_create=user_in)
    new_password = random_lower_string()
    r = client.patch(
        f"{settings.API_V1_STR}/users/{user.id}",
        headers=superuser_token_headers,
        json={"password": new_password},
    )
    assert r.status_code == 200
    db.refresh(user)
    assert verify_password(new_password, user.hashed_password) == (True, None)


def test_update_user_not_exists(
    client: TestClient, superuser_token_headers: dict[str, str]
) -> None:
    """Updating a user that does not exist is a 404."""
    data = {"full_name": "Updated_full_name"}
    r = client.patch(
        f"{settings.API_V1_STR}/users/{uuid.uuid4()}", headers=superuser_token_headers, json=data
    )
    assert r.status_code == 404
    assert r.json()["detail"] == "The user with this id does not exist in the system"


def test_update_user_email_exists(
    client: TestClient, superuser_token_headers: dict[str, str], db: Session
) -> None:
    """Giving a user the email of another is a conflict."""
    user = crud.create_user(
        session=db, user_create=UserCreate(email=random_email(), password=random_lower_string())
    )
    user2 = crud.create_user(
        session=db, user_create=UserCreate(email=random_email(), password=random_lower_string())
    )

    data = {"email": user2.email}
    r = client.patch(
        f"{settings.API_V1_STR}/users/{user.id}", headers=superuser_token_headers, json=data
    )
    assert r.status_code == 409
    assert r.json()["detail"] == "User with this email already exists"
