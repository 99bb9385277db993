"""model serving precision

Revision ID: b3c1d2e4f5a6
Revises: 3c1f0b7d9a21
Create Date: 2026-12-01 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b3c1d2e4f5a6'
down_revision: str | None = '3c1f0b7d9a21'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The precision a model is served in: "fp32", or "int8" once its owner has seen the accuracy change.
    op.add_column(
        "models", sa.Column("serving_precision", sa.String(length=8), nullable=False, server_default="fp32")
    )


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place: no table rebuild (and no ON DELETE actions fired by one).
    op.drop_column("models", "serving_precision")
