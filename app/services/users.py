"""Users. One local user owns everything until access control arrives."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import User

LOCAL_USER = "local"


def ensure_local_user(session: Session) -> User:
    user = session.scalars(select(User).where(User.name == LOCAL_USER)).first()
    if user is None:
        user = User(name=LOCAL_USER, is_admin=True)
        session.add(user)
        session.flush()
    return user
