"""What a user may reach: the rows they own (an admin: every row), by id or listed newest first."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.db.tables import Dataset, Job, Model, User
from app.domain_errors import NotFound

Owned = TypeVar("Owned", Dataset, Job, Model)


def by_id(session: Session, table: type[Owned], row_id: str) -> Owned | None:
    # No id holds a NUL, and PostgreSQL refuses one in a query parameter (a 500 instead of a 404).
    return session.get(table, row_id) if "\x00" not in row_id else None


def get_owned(session: Session, owner: User, table: type[Owned], row_id: str, noun: str) -> Owned:
    """The row, or 404 ``noun`` for one that is missing or someone else's (the two look the same)."""
    row = by_id(session, table, row_id)
    if row is None or (row.owner_id != owner.id and not owner.is_admin):
        raise NotFound(noun, row_id)
    return row


def owned_query(owner: User, table: type[Owned]) -> Select[Owned]:
    """The rows ``owner`` may list, newest first."""
    query = select(table).order_by(table.created_at.desc())
    return query if owner.is_admin else query.where(table.owner_id == owner.id)
