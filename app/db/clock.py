"""The database's clock: leases (jobs, dataset checks) are written and compared with ``now()`` in SQL, so
hosts with skewed clocks still agree on who holds what."""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime, Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement[Any]):  # lower case: it reads like the SQL function it is
    """``now() + offset seconds`` evaluated by the database: every host compares leases on one clock."""

    type = DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, offset_seconds: float = 0.0) -> None:
        super().__init__(literal(float(offset_seconds), Float()))


@compiles(db_now)
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    (offset,) = element.clauses
    return f"(now() + make_interval(secs => {compiler.process(offset, **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # The text SQLAlchemy stores for a DateTime on SQLite (UTC, microseconds), so comparisons are textual.
    (offset,) = element.clauses
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.3f seconds', {compiler.process(offset, **kw)}))"
