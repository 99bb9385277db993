"""Dependencies shared by the routes, published as ``Annotated`` aliases so signatures read plainly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.db.tables import User
from app.settings import Settings
from app.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed once when the handler succeeds, rolled back on error.
    Service functions only flush."""
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_current_user(request: Request, session: Annotated[Session, Depends(get_session)]) -> User:
    """The local user (one user until access control arrives)."""
    user = session.get(User, request.app.state.local_user_id)
    assert user is not None, "the local user is created at startup"
    return user


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]
CurrentUser = Annotated[User, Depends(get_current_user)]
