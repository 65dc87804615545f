from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import settings
from app.core.security import SCHEME, get_legacy_password_hash, verify_password
from app.tests.utils.user import create_random_user
from app.tests.utils.utils import random_lower_string


def test_get_access_token(client: TestClient) -> None:
    """The first superuser logs in with the configured password."""
    login_data = {
        "username": settings.FIRST_SUPERUSER,
        "password": settings.FIRST_SUPERUSER_PASSWORD,
    }
    r = client.post(f"{settings.API_V1_STR}/login/access-token", json=login_data)
    tokens = r.json()
    assert r.status_code == 200
    assert "access_token" in tokens
    assert tokens["access_token"]


def test_get_access_token_incorrect_password(client: TestClient) -> None:
    """A wrong password is refused."""
    login_data = {"username": settings.FIRST_SUPERUSER, "password": "incorrect"}
    r = client.post(f"{settings.API_V1_STR}/login/access-token", json=login_data)
    assert r.status_code == 400


def test_use_access_token(client: TestClient, superuser_token_headers: dict[str, str]) -> None:
    """The token identifies its user."""
    r = client.post(f"{settings.API_V1_STR}/login/test-token", headers=superuser_token_headers)
    result = r.json()
    assert r.status_code == 200
    assert result["email"] == settings.FIRST_SUPERUSER


def test_login_upgrades_legacy_password_hash(client: TestClient, db: Session) -> None:
    """Logging in with a password stored in the old scheme stores it in the new one."""
    user = create_random_user(db)
    password = random_lower_string()
    user.hashed_password = get_legacy_password_hash(password)
    db.add(user)
    db.commit()

    login_data = {"username": user.email, "password": password}
    r = client.post(f"{settings.API_V1_STR}/login/access-token", json=login_data)
    assert r.status_code == 200

    db.refresh(user)
    assert user.hashed_password.startswith(f"{SCHEME}$")
    assert verify_password(password, user.hashed_password) == (True, None)


def test_login_inactive_user(client: TestClient, db: Session) -> None:
    """An inactive user cannot log in."""
    user = create_random_user(db)
    password = random_lower_string()
    user.hashed_password = get_legacy_password_hash(password)
    user.is_active = False
    db.add(user)
    db.commit()

    login_data = {"username": user.email, "password": password}
    r = client.post(f"{settings.API_V1_STR}/login/access-token", json=login_data)
    assert r.status_code == 400
    assert r.json()["detail"] == "Inactive user"


def test_forged_token_is_refused(client: TestClient) -> None:
    """A token that was not signed by the app is refused."""
    headers = {"Authorization": "Bearer eyJzdWIiOiJ4In0.forged"}
    r = client.get(f"{settings.API_V1_STR}/users/me", headers=headers)
    assert r.status_code == 403
