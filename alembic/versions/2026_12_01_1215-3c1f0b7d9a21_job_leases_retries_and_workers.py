"""job leases, retries and the worker registry

Revision ID: 3c1f0b7d9a21
Revises: 3b9d2f6a71c4
Create Date: 2026-12-01 12:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '3c1f0b7d9a21'
down_revision: str | None = '3b9d2f6a71c4'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_JOB_COLUMNS = ("lease_expires_at", "enqueued_at", "retries", "retry_reason")


def upgrade() -> None:
    # Plain ADD COLUMNs (no table rebuild on SQLite: rebuilding jobs would fire the ON DELETE actions of
    # job_metrics and models). Running jobs of the old kind have no lease: recovery reads their heartbeat.
    op.add_column('jobs', sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('retries', sa.Integer(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('retry_reason', sa.Text(), nullable=True))
    op.create_table('workers',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('devices', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('weights', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('draining', sa.Boolean(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_index(op.f('ix_workers_lease_expires_at'), 'workers', ['lease_expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_workers_lease_expires_at'), table_name='workers')
    op.drop_table('workers')
    for column in reversed(NEW_JOB_COLUMNS):
        # SQLite (3.35+) drops a plain column in place; batch mode would rebuild the table (see upgrade).
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
