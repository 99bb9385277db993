"""Types shared by the API's answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def _utc(value: datetime) -> datetime:
    # The database hands timestamps back without an offset (SQLite always, PostgreSQL for these `timestamp`
    # columns); they were written in UTC. An answer says so: RFC 3339's date-time, which the schema
    # promises, needs the offset, and a client would otherwise read the time as its own local time.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_utc)]
"""A timestamp, always answered in UTC with its offset (``2026-01-02T03:04:05Z``)."""
