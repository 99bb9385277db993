"""job run choices

Revision ID: c4d5e6f7a8b9
Revises: b3c1d2e4f5a6
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'c4d5e6f7a8b9'
down_revision: str | None = 'b3c1d2e4f5a6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    # What the run decided itself, with its reasons: the defaults chosen from the dataset and the weights,
    # the learning-rate range test's curve, the time budget's plan.
    op.add_column("jobs", sa.Column("run_choices", JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "run_choices")
