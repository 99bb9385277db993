"""sessions carry their api key

Browser sessions remember the API key they were logged in with, so that revoking the key ends them.
Sessions made before this revision do not know their key: they are ended (everyone logs in again once).

Revision ID: fdccf5a15679
Revises: 8535c5e0e058
Create Date: 2026-12-01 09:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = 'fdccf5a15679'
down_revision: str | None = '8535c5e0e058'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM web_sessions")
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('api_key_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_web_sessions_api_key_id'), ['api_key_id'], unique=False)
        batch_op.create_foreign_key(
            batch_op.f('fk_web_sessions_api_key_id_api_keys'), 'api_keys', ['api_key_id'], ['id'], ondelete='CASCADE'
        )


def downgrade() -> None:
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_web_sessions_api_key_id_api_keys'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_web_sessions_api_key_id'))
        batch_op.drop_column('api_key_id')
