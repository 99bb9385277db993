"""Dependencies shared by the routes, published as ``Annotated`` aliases so signatures read plainly."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.db import transaction
from app.db.tables import User
from app.errors import ApiError
from app.services import auth
from app.services.keycache import PredictLookups, Principal, key_digest
from app.settings import Settings
from app.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed once when the handler succeeds, rolled back on error.
    Service functions only flush."""
    with transaction(request.app.state.sessions) as session:
        yield session


SESSION_COOKIE = "ft_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def authenticate(request: Request, session: Session) -> User | None:
    """The user behind the request, from ``Authorization: Bearer <api key>`` or the session cookie.

    A cookie-authenticated request that changes state must carry the session's CSRF token (header
    ``X-CSRF-Token``): a cookie alone proves nothing about
    which page sent the request. Bearer keys are not sent by browsers on their own, so need no token.
    """
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401, "unauthorized", "use `Authorization: Bearer <api key>`", headers={"WWW-Authenticate": "Bearer"}
            )
        found = auth.user_for_key(session, key.strip())
        if found is None:
            raise ApiError(
                401,
                "unauthorized",
                "the API key is not valid (unknown or revoked)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.user_id = found[0].id
        return found[0]
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found_session = auth.session_for_cookie(session, cookie)
        if found_session is not None:
            user, web = found_session
            if request.method not in SAFE_METHODS:
                # Compared as bytes: header values arrive as Latin-1 text, and compare_digest refuses str
                # with non-ASCII characters (a TypeError: a 500 where a wrong token is a 403).
                sent = request.headers.get(CSRF_HEADER, "").encode("latin-1")
                if not hmac.compare_digest(sent, web.csrf_token.encode()):
                    raise ApiError(403, "csrf", "missing or wrong CSRF token: reload the page and try again")
            request.state.user_id = user.id
            request.state.csrf_token = web.csrf_token
            return user
    return None


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "authentication required: send `Authorization: Bearer <api key>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


def get_current_user(request: Request, session: Annotated[Session, Depends(get_session)]) -> User:
    """The authenticated user, or 401."""
    user = authenticate(request, session)
    if user is None:
        raise unauthorized()
    # Give the connection back to the pool now (the session opens another when the handler queries): a
    # handler that then awaits (a body, a forward pass) must not hold one meanwhile. With more requests in
    # flight than connections, the requests waiting for one would take every threadpool thread, and those
    # holding one could not get a thread to finish: requests failed after the pool's 30 s timeout.
    session.commit()
    return user


def get_admin(user: Annotated[User, Depends(get_current_user)]) -> User:
    if not user.is_admin:
        raise ApiError(403, "forbidden", "this needs an admin")
    return user


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]
CurrentUser = Annotated[User, Depends(get_current_user)]
AdminUser = Annotated[User, Depends(get_admin)]


# -- the predict path: no database query and no thread hop for a key seen within the last second ----------
async def get_predict_principal(request: Request) -> Principal:
    """The caller of a predict request. A bearer key that authenticated less than a second ago in this process
    is taken from memory (``app.services.keycache``); anything else (a new key, a cookie) goes through
    ``authenticate`` on the threadpool, exactly as every other route does."""
    lookups: PredictLookups = request.app.state.predict_lookups
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    digest = key_digest(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if digest is None:
        return await run_in_threadpool(_authenticate_now, request)
    # One database lookup per key at a time, however many of its requests arrive while it runs.
    principal = await lookups.keys.get_or_load(digest, lambda: run_in_threadpool(_authenticate_now, request))
    request.state.user_id = principal.id
    return principal


def _authenticate_now(request: Request) -> Principal:
    with transaction(request.app.state.sessions) as session:  # commits the key's last_used_at
        user = authenticate(request, session)
        if user is None:
            raise unauthorized()
        return Principal(user.id, user.is_admin)


PredictUser = Annotated[Principal, Depends(get_predict_principal)]
