"""Dependencies: a session per request, the token, and the user it belongs to."""

from __future__ import annotations

import uuid
from collections.abc import Generator
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import security
from app.core.config import settings
from app.core.db import engine
from app.models import User

reusable_oauth2 = OAuth2PasswordBearer(tokenUrl=f"{settings.API_V1_STR}/login/access-token")


def get_db() -> Generator[Session, None, None]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]
TokenDep = Annotated[str, Depends(reusable_oauth2)]


def get_current_user(session: SessionDep, token: TokenDep) -> User:
    subject = security.read_access_token(token)
    try:
        user_id = uuid.UUID(subject or "")
    except ValueError:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="Could not validate credentials"
        ) from None
    statement = select(User).where(User.id == user_id)
    user = session.scalars(statement).first()  # marker: current-user-query
    if not user:
        raise HTTPException(status_code=404, detail="User not found")
    if "duplicate" in settings.MISTAKES:
        # Seeded mistake (REALWORLD_MISTAKE=duplicate): the account is read again, with the
        # same query in the same transaction, instead of reusing `user`.
        user = session.scalars(statement).one()  # marker: duplicate-lookup
    if not user.is_active:
        raise HTTPException(status_code=400, detail="Inactive user")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_current_active_superuser(current_user: CurrentUser) -> User:
    if not current_user.is_superuser:
        raise HTTPException(status_code=403, detail="The user doesn't have enough privileges")
    return current_user
