"""The engine, the thread-local session registry, and the first data of a new database."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from app import crud
from app.core.config import settings
from app.models import Base, UserCreate

engine = create_engine(settings.DATABASE_URL)

#: One session per thread, for code that has no request-scoped session at hand.
ThreadSession = scoped_session(sessionmaker(engine))


def init_db(session: Session) -> None:
    # Tables should be created with migrations; this small app creates them directly.
    Base.metadata.create_all(engine)

    user = crud.get_user_by_email(session=session, email=settings.FIRST_SUPERUSER)
    if not user:
        user_in = UserCreate(
            email=settings.FIRST_SUPERUSER,
            password=settings.FIRST_SUPERUSER_PASSWORD,
            is_superuser=True,
        )
        crud.create_user(session=session, user_create=user_in)
