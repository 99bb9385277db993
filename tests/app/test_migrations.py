"""The migrations: up, down and up again on SQLite and PostgreSQL, and the models match what they build."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select

from app.db import engine_for, session_scope
from app.db.migrate import alembic_config, downgrade, upgrade
from app.db.tables import Base, Dataset, Model, User
from tests.app.conftest import drop_pg_database, fresh_pg_database

TABLES = {"users", "api_keys", "web_sessions", "login_tokens", "datasets", "jobs", "job_metrics", "models", "workers"}


def head_revision(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def current_revision(url: str) -> str | None:
    engine = engine_for(url)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def table_names(url: str) -> set[str]:
    engine = engine_for(url)
    engine.dispose()  # a fresh connection sees the schema as the migration left it
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def schema_drift(url: str) -> list:
    engine = engine_for(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, Base.metadata)  # type: ignore[no-any-return]


def test_up_down_and_up_again(db_url: str) -> None:
    # db_url arrives migrated to head
    assert current_revision(db_url) == head_revision(db_url)
    assert table_names(db_url) == TABLES

    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert table_names(db_url) == set()

    upgrade(db_url)
    assert current_revision(db_url) == head_revision(db_url)
    assert table_names(db_url) == TABLES
    upgrade(db_url)  # already at head: nothing to do, no error
    assert current_revision(db_url) == head_revision(db_url)


def test_models_match_the_migrations(db_url: str) -> None:
    assert schema_drift(db_url) == []


def test_models_match_after_a_round_trip(db_url: str) -> None:
    downgrade(db_url, "base")
    upgrade(db_url, "head")
    assert schema_drift(db_url) == []
    indexes = {ix["name"] for ix in inspect(engine_for(db_url)).get_indexes("jobs")}
    assert {"ix_jobs_status_created_at", "ix_jobs_owner_id", "ix_jobs_dataset_id"} <= indexes


def test_each_revision_steps_down_and_up(db_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(db_url))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")]  # newest first
    for expected_after in [*revisions[1:], None]:
        downgrade(db_url, "-1")
        assert current_revision(db_url) == expected_after
    for revision in reversed(revisions):
        upgrade(db_url, "+1")
        assert current_revision(db_url) == revision
    assert schema_drift(db_url) == []


def test_byte_counts_beyond_2_gib_fit(db_url: str) -> None:
    """Uploads may be 2 GiB and expand to 8 GiB; a run of a large model passes 2 GiB too."""
    big = 5 * 1024**3
    with session_scope(db_url) as s:
        user = User(name="someone")
        s.add(user)
        s.flush()
        dataset = Dataset(
            owner_id=user.id, name="big", storage_key="datasets/x", source="zip", num_images=1, num_classes=2,
            classes=["a", "b"], report={}, size_bytes=big,
        )  # fmt: skip
        model = Model(
            owner_id=user.id, name="big", arch="resnet152", num_classes=2, classes=["a", "b"], evaluation={},
            config={}, run_key="runs/x", size_bytes=big,
        )  # fmt: skip
        s.add_all([dataset, model])
    with session_scope(db_url) as s:
        assert s.scalars(select(Dataset.size_bytes)).one() == big
        assert s.scalars(select(Model.size_bytes)).one() == big


@pytest.mark.postgres
def test_hosts_migrating_at_once_take_turns(pg_server: str) -> None:
    """Several hosts start together on an empty PostgreSQL database, each running the migrations: the advisory
    lock makes them take turns, and none fails (unlocked, they raced to create the same tables)."""
    url, name = fresh_pg_database(pg_server)
    try:
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def migrate() -> None:
            barrier.wait()
            try:
                upgrade(url)
            except BaseException as e:  # collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=migrate) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert current_revision(url) == head_revision(url)
        assert table_names(url) == TABLES
    finally:
        engine_for(url).dispose()
        drop_pg_database(pg_server, name)
