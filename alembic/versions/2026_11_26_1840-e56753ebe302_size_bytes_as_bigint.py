"""size_bytes as bigint

Revision ID: e56753ebe302
Revises: 5ff933d04f1f
Create Date: 2026-11-26 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e56753ebe302'
down_revision: str | None = '5ff933d04f1f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("datasets", "size_bytes"), ("models", "size_bytes"))


def upgrade() -> None:
    # SQLite's INTEGER is 64-bit already (the models keep INTEGER there), and rebuilding a table that jobs
    # reference would fire their ON DELETE actions: nothing to do on SQLite.
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)
