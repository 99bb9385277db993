"""datasets checked in the background, jobs record their split

A dataset row exists while its upload is checked: ``status`` (checking, ready, refused), the check's
``progress``, the refusal's ``error`` and the checker's lease. Rows made before this revision are ready.
A job records the split it trains on (``data_split``: where it came from and the counts per class).

Revision ID: 3b9d2f6a71c4
Revises: fdccf5a15679
Create Date: 2026-12-01 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '3b9d2f6a71c4'
down_revision: str | None = 'fdccf5a15679'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), server_default='ready', nullable=False))
        batch_op.add_column(sa.Column('progress', JSON, nullable=True))
        batch_op.add_column(sa.Column('error', JSON, nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(
            batch_op.f('ck_datasets_status'), "status IN ('checking', 'ready', 'refused')"
        )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data_split', JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('data_split')
    op.execute("DELETE FROM datasets WHERE status != 'ready'")
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_datasets_status'), type_='check')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('error')
        batch_op.drop_column('progress')
        batch_op.drop_column('status')
