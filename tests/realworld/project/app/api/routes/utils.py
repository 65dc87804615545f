from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import settings
from app.core.db import ThreadSession, engine

router = APIRouter(tags=["utils"])


@router.get("/health")
def health_check() -> dict[str, str]:
    """The app is up and its database answers."""
    if "leak" in settings.MISTAKES:
        # Seeded mistake (REALWORLD_MISTAKE=leak): the thread's session is never removed, so
        # it keeps its connection checked out after the request.
        session = ThreadSession()  # marker: leaked-session
        session.execute(select(1))  # marker: leaked-checkout
        return {"status": "ok"}
    with Session(engine) as session:
        session.execute(select(1))
    return {"status": "ok"}
