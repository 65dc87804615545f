"""The app's settings, read from the environment once at import (as the templates do)."""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass, field

#: Mistakes that can be seeded into the app (REALWORLD_MISTAKE, comma-separated).
MISTAKES = frozenset({"n_plus_one", "duplicate", "leak"})


def _default_database_url() -> str:
    directory = tempfile.mkdtemp(prefix="realworld-")
    return f"sqlite:///{directory}/app.db"


def _mistakes() -> frozenset[str]:
    raw = os.environ.get("REALWORLD_MISTAKE", "")
    chosen = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = chosen - MISTAKES
    if unknown:
        raise ValueError(f"REALWORLD_MISTAKE: unknown {sorted(unknown)}; known: {sorted(MISTAKES)}")
    return chosen


@dataclass(frozen=True)
class Settings:
    PROJECT_NAME: str = "Realworld"
    API_V1_STR: str = "/api/v1"
    SECRET_KEY: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # 60 minutes * 24 hours * 8 days = 8 days
    ACCESS_TOKEN_EXPIRE_MINUTES: int = 60 * 24 * 8
    DATABASE_URL: str = field(
        default_factory=lambda: os.environ.get("REALWORLD_DATABASE_URL") or _default_database_url()
    )
    FIRST_SUPERUSER: str = "admin@example.com"
    FIRST_SUPERUSER_PASSWORD: str = "changethis"
    EMAIL_TEST_USER: str = "test@example.com"
    MISTAKES: frozenset[str] = field(default_factory=_mistakes)


settings = Settings()
