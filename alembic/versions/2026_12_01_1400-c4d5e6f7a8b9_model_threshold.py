"""model threshold

Revision ID: c4d5e6f7a8b9
Revises: b3c1d2e4f5a6
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c4d5e6f7a8b9'
down_revision: str | None = 'b3c1d2e4f5a6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The owner's "unknown" threshold for predict (0..1); NULL: the one chosen on validation after training.
    op.add_column("models", sa.Column("threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("models", "threshold")
