"""Users, API keys, browser sessions and one-time login links.

Secrets are random 256-bit tokens shown once; only their SHA-256 is stored (a slow hash adds nothing for
secrets this long). API keys authenticate REST clients (``Authorization: Bearer ft_...``); a browser logs
in once (with a key or a one-time link) and gets a session cookie plus a CSRF token that every
state-changing request made with that cookie must echo. A session made with a key lives no longer than the
key (``revoke_keys``); every session of a user ends with the user.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, LoginToken, User, WebSession, utcnow

KEY_PREFIX = "ft_"
SESSION_LIFETIME = timedelta(days=7)
LOGIN_LINK_LIFETIME = timedelta(hours=24)
# last_used_at is written at most this often per key: a write per request would serialise SQLite.
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_NAME = 100


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)  # SQLite returns naive UTC


# -- users ------------------------------------------------------------------------------------------------
class UserError(ValueError):
    """A user-management request that cannot be done (the CLI prints it and exits with 2)."""


def create_user(session: Session, name: str, *, admin: bool = False) -> User:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise UserError(f"a user name must be 1-{MAX_NAME} printable characters")
    if session.scalars(select(User).where(User.name == name)).first() is not None:
        raise UserError(f"user {name!r} already exists")
    user = User(name=name, is_admin=admin)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


# -- API keys ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once
    record: ApiKey


def issue_key(session: Session, user: User, label: str = "default") -> IssuedKey:
    key = new_secret(KEY_PREFIX)
    record = ApiKey(user_id=user.id, label=label[:MAX_NAME], prefix=key[: len(KEY_PREFIX) + 6], key_hash=digest(key))
    session.add(record)
    session.flush()
    return IssuedKey(key, record)


def user_for_key(session: Session, key: str) -> tuple[User, ApiKey] | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    record = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest(key), ApiKey.revoked_at.is_(None))).first()
    if record is None:
        return None
    user = session.get(User, record.user_id)
    if user is None:
        return None
    now = utcnow()
    if record.last_used_at is None or now - _aware(record.last_used_at) > LAST_USED_RESOLUTION:
        record.last_used_at = now
    return user, record


def revoke_keys(session: Session, key_ids: Collection[str]) -> int:
    """The one place API keys stop working: each is marked revoked and every browser session logged in
    with it ends. Anything that remembers keys (a cache of them) must forget these ids when this is
    committed. Returns how many keys were active."""
    if not key_ids:
        return 0
    ids = list(key_ids)
    result = session.execute(
        update(ApiKey).where(ApiKey.id.in_(ids), ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.execute(delete(WebSession).where(WebSession.api_key_id.in_(ids)))
    session.flush()
    return int(result.rowcount)  # type: ignore[attr-defined]


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke every active key starting with ``prefix`` (as printed by ``users list``)."""
    if len(prefix) < len(KEY_PREFIX) + 4:
        raise UserError("give at least the first 7 characters of the key (as `users list` shows them)")
    active = session.scalars(
        select(ApiKey.id).where(ApiKey.prefix.startswith(prefix[: len(KEY_PREFIX) + 6]), ApiKey.revoked_at.is_(None))
    ).all()
    return revoke_keys(session, active)


def has_active_key(session: Session) -> bool:
    return bool(session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))))


# -- one-time login links ---------------------------------------------------------------------------------
def issue_login_token(session: Session, user: User) -> str:
    token = new_secret()
    session.add(LoginToken(token_hash=digest(token), user_id=user.id, expires_at=utcnow() + LOGIN_LINK_LIFETIME))
    session.flush()
    return token


def redeem_login_token(session: Session, token: str) -> User | None:
    """The token's user, once: the token is spent whether or not the login completes."""
    if not token or len(token) > 200:
        return None
    record = session.get(LoginToken, digest(token))
    if record is None or record.used_at is not None or _aware(record.expires_at) < utcnow():
        return None
    record.used_at = utcnow()
    return session.get(User, record.user_id)


# -- browser sessions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedSession:
    cookie: str  # the cookie value (shown to the browser only)
    csrf_token: str


def start_session(session: Session, user: User, api_key: ApiKey | None = None) -> IssuedSession:
    """A session for ``user``, logged in with ``api_key`` (it ends when the key is revoked) or, without
    one, with a login link (it ends with the user, or when it expires)."""
    cookie = new_secret()
    csrf = secrets.token_urlsafe(24)
    now = utcnow()
    session.add(
        WebSession(
            id_hash=digest(cookie),
            user_id=user.id,
            api_key_id=api_key.id if api_key is not None else None,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + SESSION_LIFETIME,
        )
    )
    # Expired sessions are swept as new ones start: no background job needed.
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    session.flush()
    return IssuedSession(cookie, csrf)


def session_for_cookie(session: Session, cookie: str) -> tuple[User, WebSession] | None:
    if not cookie or len(cookie) > 200:
        return None
    record = session.get(WebSession, digest(cookie))
    if record is None or _aware(record.expires_at) < utcnow():
        return None
    if record.api_key_id is not None:  # revoke_keys ends these sessions; this also covers a key revoked by hand
        key = session.get(ApiKey, record.api_key_id)
        if key is None or key.revoked_at is not None:
            return None
    user = session.get(User, record.user_id)
    return (user, record) if user is not None else None


def end_session(session: Session, cookie: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id_hash == digest(cookie)))


# -- first start ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bootstrap:
    user: User
    key: str
    login_token: str


def bootstrap_admin(session: Session) -> Bootstrap | None:
    """On a server nobody can log in to (no active API key), make sure an admin exists and give it a key
    and a one-time login link, to be printed once by the serve command (as Jupyter prints its token)."""
    if has_active_key(session):
        return None
    admin = session.scalars(select(User).where(User.is_admin.is_(True)).order_by(User.created_at)).first()
    if admin is None:
        admin = create_user(session, "admin", admin=True)
    issued = issue_key(session, admin, "created at first start")
    return Bootstrap(admin, issued.key, issue_login_token(session, admin))
