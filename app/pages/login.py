"""Logging in to the pages: with an API key or a one-time link (the serve command prints one at first
start, ``users login-link NAME`` makes more); logging out. The session cookie is HttpOnly and SameSite=Lax;
its CSRF token is put in every page for the pages' own JavaScript to send back."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.api.deps import SESSION_COOKIE, SessionDep, authenticate, get_session
from app.db.tables import ApiKey, User
from app.services import auth

router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def page_user(request: Request, session: Annotated[object, Depends(get_session)]) -> User:
    """The logged-in user of a page, or a redirect to the login page."""
    user = authenticate(request, session)  # type: ignore[arg-type]
    if user is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return user


PageUser = Annotated[User, Depends(page_user)]


def safe_next(value: str | None) -> str:
    """Only local paths: a login link must not become an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else "/"


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "")


def _logged_in(request: Request, user: User, session: SessionDep, target: str, key: ApiKey | None = None) -> Response:
    issued = auth.start_session(session, user, key)
    # Committed before the answer: the request dependency would commit only after the response went out, and
    # a browser that follows the redirect at once would come back with a cookie the database does not know.
    session.commit()
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        issued.cookie,
        max_age=int(auth.SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, session: SessionDep, token: str | None = None, next: str | None = None) -> Response:
    from app.pages.routes import render

    if token:
        user = auth.redeem_login_token(session, token)
        if user is not None:
            return _logged_in(request, user, session, safe_next(next))
        return render(
            request,
            "login.html",
            {
                "title": "Log in",
                "error": "This login link is not valid any more "
                "(links work once and expire after 24 hours). Log in with an API key, or ask an admin for "
                "a new link (`python -m app.cli users login-link NAME`).",
                "next": safe_next(next),
            },
            401,
        )
    return render(request, "login.html", {"title": "Log in", "error": None, "next": safe_next(next)})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    from app.pages.routes import render

    if not _same_origin(request):
        return render(
            request, "login.html", {"title": "Log in", "error": "Cross-site login refused.", "next": "/"}, 403
        )
    found = auth.user_for_key(session, api_key.strip())
    if found is None:
        return render(
            request,
            "login.html",
            {"title": "Log in", "error": "That API key is not valid.", "next": safe_next(next)},
            401,
        )
    return _logged_in(request, found[0], session, safe_next(next), key=found[1])


@router.post("/logout")
def logout(request: Request, session: SessionDep, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    found = auth.session_for_cookie(session, cookie) if cookie else None
    if found is not None and hmac.compare_digest(csrf_token.encode(), found[1].csrf_token.encode()):
        auth.end_session(session, cookie or "")
        session.commit()  # ended before the answer says so
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
