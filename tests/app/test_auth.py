"""Access control: every API route and /metrics need a valid key or session (401 in the one error shape),
the probes stay open, pages send strangers to /login, logging in with a key or a one-time link, CSRF on
cookie requests that change state, logging out, the first-start announcement and the ``users`` command."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session as OrmSession

from app import cli
from app.api.deps import CSRF_HEADER, SESSION_COOKIE
from app.cli import announce_first_login
from app.db import session_scope
from app.db.tables import ApiKey, Dataset, Job, LoginToken, Model, User, WebSession, new_id, utcnow
from app.main import API_PREFIX, create_app
from app.pages.routes import CHART_JS_URL
from app.services import auth
from app.settings import Settings
from app.storage import Storage
from tests.app.conftest import (
    Account,
    assert_error,
    authed_client,
    dataset_files,
    make_account,
    settings_env,
    sqlite_only,
    upload_zip,
    zip_bytes,
)

REPO = Path(__file__).resolve().parents[2]
# GET routes outside the API that anyone may read: probes, the login page, the chart library.
OPEN_GETS = {"/healthz", "/readyz", "/login", CHART_JS_URL}

# Access control does not depend on the database: these run on SQLite (the isolation tests cover both).
pytestmark = sqlite_only


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def anon(app: FastAPI) -> Iterator[TestClient]:
    """A client with no credentials (its cookie jar fills when it logs in)."""
    with TestClient(app, follow_redirects=False) as c:
        yield c


def routes_of(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route of the app with an endpoint (``app.routes``, included routers flattened)."""
    return [
        (method, str(ctx.path))
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.original_route, APIRoute)
        for method in sorted(ctx.methods or ())
    ]


def fill(path: str) -> str:
    """A path with its parameters filled with an id nobody has (and thumbnail 0)."""
    return re.sub(r"\{\w+\}", "0123456789abcdef", path.replace("{index}", "0"))


def protected_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every API route and /metrics, parameters filled in."""
    return [
        (method, fill(path))
        for method, path in routes_of(app)
        if path.startswith(API_PREFIX + "/") or path == "/metrics"
    ]


def page_routes(app: FastAPI) -> list[str]:
    """Every HTML page (GET routes outside the API other than the open ones), parameters filled in."""
    return [
        fill(path)
        for method, path in routes_of(app)
        if method == "GET" and not path.startswith(API_PREFIX + "/") and path not in OPEN_GETS | {"/metrics"}
    ]


def request(client: TestClient, method: str, path: str, **kwargs: Any) -> Any:
    # A JSON body that parses: a body FastAPI cannot read would be refused (422) before authentication runs.
    if method in ("POST", "PUT", "PATCH"):
        kwargs.setdefault("json", {})
    return client.request(method, path, **kwargs)


# -- no credentials, wrong credentials --------------------------------------------------------------------


def test_the_table_of_protected_routes_is_complete(app: FastAPI) -> None:
    routes = protected_routes(app)
    paths = {p for _, p in routes}
    assert ("GET", "/metrics") in routes and ("POST", "/api/v1/datasets") in routes
    assert any("/predict" in p for p in paths) and any(p.endswith("/events") for p in paths)
    assert len(routes) >= 20


def test_every_api_route_needs_credentials(anon: TestClient, app: FastAPI, admin: Account) -> None:
    for method, path in protected_routes(app):
        r = request(anon, method, path)
        error = assert_error(r, 401, "unauthorized")
        assert "Bearer" in error["message"], (method, path)
        assert r.headers["www-authenticate"] == "Bearer", (method, path)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer ft_not-a-key-anyone-has",
        "Bearer not-even-prefixed",
        "Bearer " + "ft_" + "x" * 300,
        "Bearer ",
        "Basic YWRtaW46YWRtaW4=",
        "ft_the-key-without-a-scheme",
    ],
)
def test_a_wrong_key_is_401_on_every_route(anon: TestClient, app: FastAPI, admin: Account, authorization: str) -> None:
    for method, path in protected_routes(app):
        r = request(anon, method, path, headers={"Authorization": authorization})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer", (method, path)


def test_a_wrong_key_is_401_even_with_a_session_cookie(anon: TestClient, admin: Account) -> None:
    login(anon, admin.key)
    assert anon.get("/api/v1/datasets").status_code == 200
    assert_error(anon.get("/api/v1/datasets", headers={"Authorization": "Bearer ft_nope"}), 401, "unauthorized")


def test_a_revoked_key_is_401_everywhere(anon: TestClient, app: FastAPI, settings: Settings) -> None:
    user = make_account(settings, "revoked-soon")
    assert anon.get("/api/v1/datasets", headers=user.headers).status_code == 200
    with session_scope(settings.db_url) as s:
        assert auth.revoke_key(s, user.key[:9]) == 1
    for method, path in protected_routes(app):
        assert_error(request(anon, method, path, headers=user.headers), 401, "unauthorized")
    # the user's other keys keep working
    with session_scope(settings.db_url) as s:
        other = auth.issue_key(s, auth.get_user(s, "revoked-soon")).key
    assert anon.get("/api/v1/datasets", headers={"Authorization": f"Bearer {other}"}).status_code == 200


def test_metrics_need_an_admin(anon: TestClient, admin: Account, settings: Settings) -> None:
    user = make_account(settings, "plain")
    assert_error(anon.get("/metrics", headers=user.headers), 403, "forbidden")
    assert anon.get("/metrics", headers=admin.headers).status_code == 200


def test_probes_stay_open(anon: TestClient) -> None:
    assert anon.get("/healthz").json() == {"status": "ok"}
    r = anon.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert anon.get("/login").status_code == 200


def test_pages_send_strangers_to_login(anon: TestClient, app: FastAPI) -> None:
    pages = page_routes(app)
    assert {"/", "/datasets/new", "/jobs/new"} <= set(pages) and len(pages) >= 6
    for page in [*pages, "/jobs/new?dataset=abc&x=%2F"]:
        r = anon.get(page)
        assert r.status_code == 303, page
        assert r.headers["location"] == "/login?next=" + quote(page, safe=""), page


def test_pages_with_a_wrong_key_go_to_login_too(anon: TestClient) -> None:
    r = anon.get("/", headers={"Authorization": "Bearer ft_wrong"})
    assert_error(r, 401, "unauthorized")  # a key that was sent and is wrong is an error, not a login prompt
    anon.cookies.set(SESSION_COOKIE, "not-a-session")
    r = anon.get("/datasets/new")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fdatasets%2Fnew"


# -- logging in with a key ----------------------------------------------------------------------------------


def login(client: TestClient, key: str, next_url: str = "/") -> Any:
    return client.post("/login", data={"api_key": key, "next": next_url}, follow_redirects=False)


def csrf_token_of(client: TestClient) -> str:
    """The CSRF token the pages carry (what the pages' JavaScript sends back)."""
    html = client.get("/").text
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match, html[:500]
    return match.group(1)


def test_login_with_a_key_sets_a_safe_cookie(anon: TestClient, admin: Account) -> None:
    r = login(anon, admin.key, "/jobs/new?dataset=abc")
    assert r.status_code == 303
    assert r.headers["location"] == "/jobs/new?dataset=abc"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")[1:]}
    assert "httponly" in attributes
    assert attributes["samesite"].strip().lower() == "samesite=lax"
    assert attributes["path"].strip() == "Path=/"
    assert "secure" not in attributes  # plain http here; https requests get Secure
    assert admin.key not in cookie
    page = anon.get("/")
    assert page.status_code == 200 and "Log out" in page.text
    assert anon.get("/api/v1/datasets").status_code == 200  # the API takes the cookie for reading


def test_the_cookie_is_secure_over_https(app: FastAPI, admin: Account) -> None:
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        r = login(c, admin.key)
        assert r.status_code == 303
        assert "secure" in r.headers["set-cookie"].lower()


@pytest.mark.parametrize(
    "next_url",
    [
        "//evil.example",
        "//evil.example/path",
        "http://evil.example",
        "https://evil.example/login",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "",
        "///evil.example",
    ],
)
def test_login_never_redirects_off_site(anon: TestClient, admin: Account, settings: Settings, next_url: str) -> None:
    r = login(anon, admin.key, next_url)
    assert r.status_code == 303 and r.headers["location"] == "/"
    with session_scope(settings.db_url) as s:
        token = auth.issue_login_token(s, auth.get_user(s, "admin"))
    r = anon.get("/login", params={"token": token, "next": next_url})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_login_page_keeps_only_a_local_next(anon: TestClient) -> None:
    assert 'name="next" value="/jobs/new"' in anon.get("/login", params={"next": "/jobs/new"}).text
    assert 'name="next" value="/"' in anon.get("/login", params={"next": "//evil.example"}).text


def test_login_with_a_wrong_key_sets_no_cookie(anon: TestClient, admin: Account) -> None:
    for key in ("ft_wrong", "", admin.key + "x", "x" * 100):
        r = login(anon, key)
        assert r.status_code == 401, key
        assert "set-cookie" not in r.headers
        assert "not valid" in r.text
    assert anon.get("/").status_code == 303


def test_login_from_another_site_is_refused(anon: TestClient, admin: Account) -> None:
    r = anon.post("/login", data={"api_key": admin.key, "next": "/"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = anon.post("/login", data={"api_key": admin.key, "next": "/"}, headers={"Origin": "http://testserver"})
    assert r.status_code == 303 and SESSION_COOKIE in r.headers["set-cookie"]


def test_a_revoked_key_cannot_log_in(anon: TestClient, settings: Settings) -> None:
    user = make_account(settings, "gone")
    with session_scope(settings.db_url) as s:
        auth.revoke_key(s, user.key[:9])
    assert login(anon, user.key).status_code == 401


# -- one-time login links -----------------------------------------------------------------------------------


def new_link(settings: Settings, name: str = "admin") -> str:
    with session_scope(settings.db_url) as s:
        return auth.issue_login_token(s, auth.get_user(s, name))


def test_a_login_link_works_once(app: FastAPI, admin: Account, settings: Settings) -> None:
    token = new_link(settings)
    with TestClient(app, follow_redirects=False) as first:
        r = first.get("/login", params={"token": token, "next": "/datasets/new"})
        assert r.status_code == 303 and r.headers["location"] == "/datasets/new"
        assert "httponly" in r.headers["set-cookie"].lower()
        assert first.get("/datasets/new").status_code == 200
    with TestClient(app, follow_redirects=False) as second:
        r = second.get("/login", params={"token": token})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert "not valid any more" in r.text
        assert second.get("/").status_code == 303


def test_a_login_link_expires(anon: TestClient, admin: Account, settings: Settings) -> None:
    token = new_link(settings)
    with session_scope(settings.db_url) as s:
        s.execute(update(LoginToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = anon.get("/login", params={"token": token})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    # a fresh one is good for a day
    token = new_link(settings)
    with session_scope(settings.db_url) as s:
        record = s.get(LoginToken, auth.digest(token))
        assert record is not None
        left = auth._aware(record.expires_at) - utcnow()
        assert timedelta(hours=23) < left <= auth.LOGIN_LINK_LIFETIME
    assert anon.get("/login", params={"token": token}).status_code == 303


@pytest.mark.parametrize("token", ["nope", "x" * 300, "ft_" + "a" * 40])
def test_a_made_up_link_is_refused(anon: TestClient, admin: Account, token: str) -> None:
    r = anon.get("/login", params={"token": token})
    assert r.status_code == 401 and "set-cookie" not in r.headers


# -- CSRF ---------------------------------------------------------------------------------------------------


@pytest.fixture
def browser(app: FastAPI, settings: Settings) -> Iterator[tuple[TestClient, Account]]:
    """A logged-in browser of an ordinary user (cookie only, no bearer key)."""
    user = make_account(settings, "browser-user")
    with TestClient(app, follow_redirects=False) as c:
        assert login(c, user.key).status_code == 303
        yield c, user


def test_cookie_requests_that_change_state_need_the_csrf_token(
    browser: tuple[TestClient, Account], app: FastAPI
) -> None:
    c, user = browser
    with authed_client(app, user) as api:
        dataset = upload_zip(api, dataset_files(per_class=4))
    token = csrf_token_of(c)
    job = {"dataset_id": dataset["id"], "model": "lenet", "weights": "none", "epochs": 1}
    archive = {"archive": ("d.zip", zip_bytes(dataset_files(per_class=4)))}
    for headers in ({}, {CSRF_HEADER: "wrong"}, {CSRF_HEADER: ""}, {CSRF_HEADER: token + "x"}):
        assert_error(c.post("/api/v1/jobs", json=job, headers=headers), 403, "csrf")
        assert_error(c.post("/api/v1/datasets", headers=headers, files=archive), 403, "csrf")
        assert_error(c.delete(f"/api/v1/datasets/{dataset['id']}", headers=headers), 403, "csrf")
    assert c.get("/api/v1/jobs").json() == []
    assert [d["id"] for d in c.get("/api/v1/datasets").json()] == [dataset["id"]]

    good = {CSRF_HEADER: token}
    r = c.post("/api/v1/jobs", json=job, headers=good)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert_error(c.post(f"/api/v1/jobs/{job_id}/cancel"), 403, "csrf")
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", headers=good).json()["status"] == "cancelled"
    assert_error(c.delete(f"/api/v1/jobs/{job_id}"), 403, "csrf")
    assert c.delete(f"/api/v1/jobs/{job_id}", headers=good).status_code == 204
    assert c.delete(f"/api/v1/datasets/{dataset['id']}", headers=good).status_code == 204
    assert c.get("/api/v1/datasets").json() == []
    r = c.post("/api/v1/datasets", headers=good, files=archive)
    assert r.status_code == 201, r.text


def test_the_csrf_token_belongs_to_its_session(browser: tuple[TestClient, Account], app: FastAPI) -> None:
    c, _ = browser
    with TestClient(app, follow_redirects=False) as other:
        assert login(other, make_account(app.state.settings, "someone").key).status_code == 303
        assert_error(
            c.post("/api/v1/jobs", json={"dataset_id": "x"}, headers={CSRF_HEADER: csrf_token_of(other)}), 403, "csrf"
        )


def test_a_csrf_token_that_is_not_ascii_is_refused_not_a_crash(browser: tuple[TestClient, Account]) -> None:
    """compare_digest refuses str with non-ASCII characters: this was a 500."""
    c, _ = browser
    for value in ("é".encode(), "токен".encode(), b"\xff" * 40, csrf_token_of(c).encode() + b"\xe9"):
        assert_error(c.post("/api/v1/jobs", json={"dataset_id": "x"}, headers={CSRF_HEADER: value}), 403, "csrf")


def test_bearer_requests_need_no_csrf_token(client: TestClient) -> None:
    dataset = upload_zip(client, dataset_files(per_class=4))
    assert client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 204


# -- sessions end -------------------------------------------------------------------------------------------


def test_logout_ends_the_session(browser: tuple[TestClient, Account], settings: Settings) -> None:
    c, _ = browser
    cookie = c.cookies[SESSION_COOKIE]
    r = c.post("/logout", data={"csrf_token": csrf_token_of(c)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert f'{SESSION_COOKIE}=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    with session_scope(settings.db_url) as s:
        assert s.scalars(select(WebSession)).all() == []
    # the old cookie, sent again, opens nothing
    c.cookies.clear()
    c.cookies.set(SESSION_COOKIE, cookie)
    assert c.get("/").status_code == 303
    assert_error(c.get("/api/v1/datasets"), 401, "unauthorized")


def logged_in(app: FastAPI, *, key: str | None = None, link: str | None = None) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    r = login(c, key) if key else c.get("/login", params={"token": link})
    assert r.status_code == 303, r.text
    return c


def test_revoking_a_key_ends_the_sessions_made_with_it(app: FastAPI, settings: Settings) -> None:
    """They lived on for their 7 days: a session did not know which key made it."""
    first = make_account(settings, "two-keys")
    with session_scope(settings.db_url) as s:
        second = auth.issue_key(s, auth.get_user(s, "two-keys"), "second").key
    with_first, with_second = logged_in(app, key=first.key), logged_in(app, key=second)
    with_link = logged_in(app, link=new_link(settings, "two-keys"))
    browsers = (with_first, with_second, with_link)
    assert [b.get("/").status_code for b in browsers] == [200, 200, 200]
    with session_scope(settings.db_url) as s:
        assert auth.revoke_key(s, first.key[:9]) == 1
    assert with_first.get("/").status_code == 303
    assert_error(with_first.get("/api/v1/datasets"), 401, "unauthorized")
    assert [b.get("/").status_code for b in browsers[1:]] == [200, 200]  # other keys' and the link's live on
    with session_scope(settings.db_url) as s:
        key_ids = {k.prefix: k.id for k in s.scalars(select(ApiKey))}
        sessions = list(s.scalars(select(WebSession)))
        assert sorted(str(w.api_key_id) for w in sessions) == sorted([key_ids[second[:9]], "None"])
        # a key revoked some other way (by hand in the database) ends its sessions all the same
        s.execute(update(ApiKey).where(ApiKey.id == key_ids[second[:9]]).values(revoked_at=utcnow()))
    assert with_second.get("/").status_code == 303 and with_link.get("/").status_code == 200
    for b in browsers:
        b.close()


@pytest.mark.parametrize("how", ["key", "link"])
def test_login_commits_the_session_before_it_answers(
    app: FastAPI, admin: Account, settings: Settings, how: str
) -> None:
    """The request's database session committed after the 303 had gone out: a browser following the redirect
    at once could come back with a cookie the database did not know yet."""
    order: list[str] = []

    def before_flush(session: Any, *_: Any) -> None:
        if any(isinstance(o, WebSession) for o in session.new):
            session.info["new_web_session"] = True

    def after_commit(session: Any) -> None:
        if session.info.pop("new_web_session", False):
            order.append("session row committed")

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        async def recorded(message: Any) -> None:
            if message["type"] == "http.response.start" and scope.get("path") == "/login":
                order.append(f"{message['status']} sent")
            await send(message)

        await app(scope, receive, recorded)

    event.listen(OrmSession, "before_flush", before_flush)
    event.listen(OrmSession, "after_commit", after_commit)
    try:
        with TestClient(recorder, follow_redirects=False) as c:
            r = login(c, admin.key) if how == "key" else c.get("/login", params={"token": new_link(settings)})
            assert r.status_code == 303
    finally:
        event.remove(OrmSession, "before_flush", before_flush)
        event.remove(OrmSession, "after_commit", after_commit)
    assert order == ["session row committed", "303 sent"]


def test_an_expired_session_is_over(browser: tuple[TestClient, Account], settings: Settings) -> None:
    c, _ = browser
    assert c.get("/").status_code == 200
    with session_scope(settings.db_url) as s:
        s.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert c.get("/").status_code == 303
    assert_error(c.get("/api/v1/jobs"), 401, "unauthorized")


# -- first start ----------------------------------------------------------------------------------------------


def test_first_start_prints_a_login_link_and_a_key_once(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    announce_first_login(settings, "0.0.0.0", 8123)
    out = capsys.readouterr().out
    link = re.search(r"http://127\.0\.0\.1:8123/login\?token=(\S+)", out)
    key = re.search(r"^\s+(ft_\S+)$", out, re.MULTILINE)
    assert link and key, out
    with session_scope(settings.db_url) as s:
        found = auth.user_for_key(s, key.group(1))
        assert found is not None and found[0].is_admin and found[0].name == "admin"
    announce_first_login(settings, "0.0.0.0", 8123)  # second start: nothing to say
    assert capsys.readouterr().out == ""
    with TestClient(create_app(settings), follow_redirects=False) as c:
        assert c.get("/login", params={"token": link.group(1)}).status_code == 303
        assert c.get("/").status_code == 200
        assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {key.group(1)}"}).status_code == 200


def test_bootstrap_admin(settings: Settings) -> None:
    with session_scope(settings.db_url) as s:
        first = auth.bootstrap_admin(s)
        assert first is not None and first.user.is_admin and first.key.startswith(auth.KEY_PREFIX)
        admin_id = first.user.id
    with session_scope(settings.db_url) as s:
        assert auth.bootstrap_admin(s) is None  # someone can log in: nothing to do
        # keys are stored hashed, never in clear
        stored = s.scalars(select(ApiKey)).one()
        assert stored.key_hash == auth.digest(first.key) and first.key not in (stored.prefix, stored.key_hash)
        assert auth.revoke_key(s, first.key[:9]) == 1
    with session_scope(settings.db_url) as s:
        # every key revoked: the same admin gets a new key and link (no second admin)
        again = auth.bootstrap_admin(s)
        assert again is not None and again.user.id == admin_id and again.key != first.key
        assert [u.name for u in s.scalars(select(User))] == ["admin"]


def test_bootstrap_gives_an_existing_admin_the_key(settings: Settings) -> None:
    with session_scope(settings.db_url) as s:
        boss = auth.create_user(s, "boss", admin=True)
        auth.create_user(s, "plain")
        boss_id = boss.id
    with session_scope(settings.db_url) as s:
        first = auth.bootstrap_admin(s)
        assert first is not None and first.user.id == boss_id
        assert {u.name for u in s.scalars(select(User))} == {"boss", "plain"}


# -- the users command ------------------------------------------------------------------------------------------


def users(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "users", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_users_command(settings: Settings, app: FastAPI) -> None:
    r = users(settings, "create", "alice")
    assert r.returncode == 0, r.stderr
    assert "created user 'alice'" in r.stdout
    alice_key = r.stdout.strip().splitlines()[-1]
    assert alice_key.startswith(auth.KEY_PREFIX)
    r = users(settings, "create", "root", "--admin", "--label", "ops")
    assert r.returncode == 0 and "created admin 'root'" in r.stdout, r.stderr
    r = users(settings, "create", "alice")
    assert r.returncode == 2 and r.stderr.strip() == "error: user 'alice' already exists" and not r.stdout

    r = users(settings, "key", "alice", "--label", "laptop")
    assert r.returncode == 0, r.stderr
    laptop_key = r.stdout.strip()
    assert laptop_key.startswith(auth.KEY_PREFIX) and laptop_key != alice_key

    r = users(settings, "list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert set(rows) == {"alice", "root"}
    assert "admin" in rows["root"] and "(ops)" in rows["root"]
    assert "admin" not in rows["alice"] and alice_key[:9] in rows["alice"] and "(laptop)" in rows["alice"]
    assert alice_key not in r.stdout  # only prefixes are ever shown again

    with TestClient(app, follow_redirects=False) as c:
        for key in (alice_key, laptop_key):
            assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200

        r = users(settings, "revoke", alice_key[:9])
        assert r.returncode == 0 and "revoked 1 key(s)" in r.stdout, r.stderr
        assert_error(c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {alice_key}"}), 401)
        assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {laptop_key}"}).status_code == 200

        r = users(settings, "login-link", "alice")
        assert r.returncode == 0, r.stderr
        match = re.fullmatch(rf"http://{settings.host}:{settings.port}/login\?token=(\S+)", r.stdout.strip())
        assert match, r.stdout
        assert c.get("/login", params={"token": match.group(1)}).status_code == 303
        assert c.get("/").status_code == 200
        c.cookies.clear()
        assert c.get("/login", params={"token": match.group(1)}).status_code == 401  # once

        r = users(settings, "delete", "alice")
        assert r.returncode == 0 and "deleted user 'alice'" in r.stdout, r.stderr
        assert_error(c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {laptop_key}"}), 401)
    with session_scope(settings.db_url) as s:
        assert [u.name for u in s.scalars(select(User))] == ["root"]


def add_job(settings: Settings, owner_id: str, dataset_id: str | None, status: str, *, model: bool = False) -> str:
    """A job row (and its model) as the worker would leave them, with a file in its run folder."""
    job_id = new_id()
    run_key = Storage.run_key(job_id)
    (settings.data_dir / run_key).mkdir(parents=True)
    (settings.data_dir / run_key / "run.json").write_text("{}")
    with session_scope(settings.db_url) as s:
        job = Job(id=job_id, owner_id=owner_id, dataset_id=dataset_id, status=status, config={}, arch="lenet",
                  weights="none", strategy="full", run_key=run_key)  # fmt: skip
        s.add(job)
        s.flush()
        if model:
            s.add(Model(owner_id=owner_id, job_id=job_id, name="m", arch="lenet", num_classes=2, classes=["a", "b"],
                        evaluation={}, config={}, run_key=run_key))  # fmt: skip
    return job_id


def run_users(settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    return cli.main(["users", *args])


def test_deleting_a_user_removes_everything_of_theirs(
    app: FastAPI, admin: Account, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Rows went with the user (ON DELETE CASCADE) but the files stayed, and sessions lived on."""
    leaving, staying = make_account(settings, "leaving"), make_account(settings, "staying")
    with authed_client(app, leaving) as api:
        gone = upload_zip(api, dataset_files(per_class=4))
    with authed_client(app, staying) as api:
        kept = upload_zip(api, dataset_files(per_class=4))
    job_id = add_job(settings, leaving.user_id, gone["id"], "succeeded", model=True)
    browsers = [logged_in(app, key=leaving.key), logged_in(app, link=new_link(settings, "leaving"))]
    assert [b.get("/").status_code for b in browsers] == [200, 200]
    data = settings.data_dir
    assert (data / "datasets" / gone["id"]).is_dir() and (data / "runs" / job_id).is_dir()

    assert run_users(settings, monkeypatch, "delete", "leaving") == 0
    assert "deleted user 'leaving'" in capsys.readouterr().out
    assert not (data / "datasets" / gone["id"]).exists() and not (data / "runs" / job_id).exists()
    assert (data / "datasets" / kept["id"]).is_dir()
    assert [b.get("/").status_code for b in browsers] == [303, 303]
    with session_scope(settings.db_url) as s:
        assert s.scalars(select(WebSession)).all() == []
        assert {k.user_id for k in s.scalars(select(ApiKey))} == {admin.user_id, staying.user_id}
        assert [d.id for d in s.scalars(select(Dataset))] == [kept["id"]]
        assert s.scalars(select(Job)).all() == [] and s.scalars(select(Model)).all() == []
    for b in browsers:
        b.close()


def test_a_user_with_running_jobs_is_not_deleted(
    app: FastAPI, admin: Account, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    busy = make_account(settings, "busy")
    with authed_client(app, busy) as api:
        dataset = upload_zip(api, dataset_files(per_class=4))
    queued = add_job(settings, busy.user_id, dataset["id"], "queued")
    assert run_users(settings, monkeypatch, "delete", "busy") == 2
    err = capsys.readouterr().err
    assert "1 queued or running job(s)" in err and queued in err and "cancel them first" in err
    # an admin's job running on the user's dataset holds it too
    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == queued).values(status="cancelled"))
    running = add_job(settings, admin.user_id, dataset["id"], "running")
    assert run_users(settings, monkeypatch, "delete", "busy") == 2
    assert running in capsys.readouterr().err
    with session_scope(settings.db_url) as s:
        assert auth.get_user(s, "busy") is not None and s.get(Dataset, dataset["id"]) is not None
        assert auth.user_for_key(s, busy.key) is not None  # nothing revoked either
    assert (settings.data_dir / "datasets" / dataset["id"]).is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "taken"), "already exists"),
        (("create", "bad\x01name"), "printable characters"),
        (("create", "x" * 101), "printable characters"),
        (("key", "nobody"), "no user named 'nobody'"),
        (("login-link", "nobody"), "no user named 'nobody'"),
        (("delete", "nobody"), "no user named 'nobody'"),
        (("revoke", "ft_"), "at least the first 7 characters"),
        (("revoke", "ft_zzzzzzzz"), "no active key starts with"),
        (("create",), "needs a NAME"),
        (("rename", "taken"), "invalid choice"),
    ],
)
def test_users_command_refuses_bad_requests(
    settings: Settings, args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """In this process, for speed (test_users_command runs the real command, a refusal among its steps)."""
    make_account(settings, "taken")
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    try:
        code = cli.main(["users", *args])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    with session_scope(settings.db_url) as s:
        assert [u.name for u in s.scalars(select(User))] == ["taken"]  # nothing changed
