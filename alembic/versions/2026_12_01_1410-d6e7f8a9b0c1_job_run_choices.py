"""job run choices

Revision ID: d6e7f8a9b0c1
Revises: c4d5e6f7a8b9
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'd6e7f8a9b0c1'
down_revision: str | None = 'c4d5e6f7a8b9'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    # What the run decided itself, with its reasons: the defaults chosen from the dataset and the weights,
    # the learning-rate range test's curve, the time budget's plan.
    op.add_column("jobs", sa.Column("run_choices", JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "run_choices")
