from __future__ import annotations

from fastapi.testclient import TestClient

from app.core.config import settings


def test_health_check(client: TestClient) -> None:
    """The health check answers when the database does."""
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_docs(client: TestClient) -> None:
    """The interactive API documentation is served."""
    r = client.get("/docs")
    assert r.status_code == 200
    assert "swagger-ui" in r.text


def test_redoc(client: TestClient) -> None:
    """The ReDoc documentation is served."""
    r = client.get("/redoc")
    assert r.status_code == 200
    assert "redoc" in r.text


def test_openapi_schema(client: TestClient) -> None:
    """The OpenAPI schema lists the API's paths."""
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert f"{settings.API_V1_STR}/items/" in paths
    assert f"{settings.API_V1_STR}/users/{{user_id}}" in paths
    assert f"{settings.API_V1_STR}/login/access-token" in paths
