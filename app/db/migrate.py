"""Applying migrations from code (the serve, worker and migrate commands, the tests).

On PostgreSQL, migrations run under a session-level advisory lock: hosts starting together (an API and
three workers after a deploy) take turns, and the ones after the first find nothing left to do. SQLite
serialises writers by itself (and is single-host only).
"""

from __future__ import annotations

import logging

from alembic.config import Config
from sqlalchemy import text

from alembic import command
from app.db import make_engine
from app.settings import REPO_ROOT

log = logging.getLogger(__name__)
# pg_advisory_lock takes a bigint: a fixed one that means "finetune-service migrations".
MIGRATION_LOCK_KEY = 0x66745F6D69677261  # "ft_migra"


def alembic_config(url: str) -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run_locked(url: str, action: str, revision: str) -> None:
    if not url.startswith("postgresql"):
        getattr(command, action)(alembic_config(url), revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            try:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                getattr(command, action)(cfg, revision)
                conn.commit()
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    _run_locked(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    _run_locked(url, "downgrade", revision)
